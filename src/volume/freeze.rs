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
//!   4 KiB pages (only those) to the preservation file (`captures/<v>-<s>.cow`),
//!   records them, then writes;
//! - the capture worker reads the block from the live file, *then* lays the recorded
//!   pages over it, then marks the block done; writers stop preserving it.
//!
//! Why this is exact: a write lands after its pages were recorded. If it lands before
//! the worker's read of the page, the record exists before the worker looks for it and
//! the old page comes from the copy; if after, the worker read the old page itself.
//! Each block's records are guarded by one lock (of [`SHARDS`]), held across "is this
//! page recorded? copy it, record it", so a page is copied once, before any write.
//!
//! Re-examined ranges skip holes ([`Freeze::plan_reexamine`]): a block that is a hole
//! of the live file when the plan is made, and that no writer has touched since the
//! freeze, read as zeros at the freeze (a punch that made it a hole after the freeze
//! went through [`Freeze::protect`] first, which marks it touched before it happens).
//!
//! Bytes at or past the frozen size read as zeros, so a capture never sees data
//! written after the freeze beyond the old end of the volume.
//!
//! The preservation file describes itself: each preserved page is one slot of
//! [`SLOT_BYTES`] (a header naming the page, with a checksum, then the page), written
//! in the same `pwrite` as the rest of its run, and that `pwrite` returns before the
//! write it protects is issued. After a `kill -9`, the file therefore holds every
//! page any write since the freeze changed ([`Freeze::reopen`] reads them back; a slot
//! reserved but never written reads as zeros and fails its checksum), so an
//! interrupted capture resumes with exactly its point in time. A power loss gives no
//! such order (nothing is synced before the write): a capture a host crash
//! interrupted is not resumed.
//!
//! A block is *done* once its entry is committed (the capture worker's read alone is
//! not enough: a reader of the pending image still needs its frozen contents until
//! the entry can be read instead), and writers stop preserving it then.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::storage::{Storage, StorageFile};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{Mutex, MutexGuard, lock};

use super::bitmap::Bitmap;
use super::dirty::DirtyMap;

/// Unit of preservation: what one small write can change.
pub const PAGE: u64 = 4096;

/// Locks over the preservation records; a block always uses the same one.
const SHARDS: usize = 64;

/// Blocks handed to a capture worker at a time.
pub const UNIT_BLOCKS: u64 = 64;

/// Page index (byte offset / [`PAGE`]) → offset of its preserved copy.
type Records = HashMap<u64, u64>;

/// A preserved page's slot in the preservation file: header, then the page.
const SLOT_HEADER: u64 = 32;
pub const SLOT_BYTES: u64 = SLOT_HEADER + PAGE;
const SLOT_MAGIC: &[u8; 8] = b"EBSCOWP1";

/// The checksum in a slot's header: of the page's index and its bytes.
fn slot_check(page: u64, data: &[u8]) -> [u8; 16] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&page.to_le_bytes());
    hasher.update(data);
    let mut out = [0u8; 16];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    out
}

/// Fills `slot` (one [`SLOT_BYTES`]) for `page`, whose bytes are already in place.
fn seal_slot(slot: &mut [u8], page: u64) {
    let check = slot_check(page, &slot[SLOT_HEADER as usize..]);
    slot[..8].copy_from_slice(SLOT_MAGIC);
    slot[8..16].copy_from_slice(&page.to_le_bytes());
    slot[16..32].copy_from_slice(&check);
}

/// The page a slot holds, if it is whole.
fn open_slot(slot: &[u8]) -> Option<u64> {
    if slot.len() != SLOT_BYTES as usize || &slot[..8] != SLOT_MAGIC {
        return None;
    }
    let page = u64::from_le_bytes(slot[8..16].try_into().ok()?);
    (slot[16..32] == slot_check(page, &slot[SLOT_HEADER as usize..])).then_some(page)
}

/// The live contents of a volume, as reads see them (a volume made from a snapshot
/// reads blocks it has not written from the snapshot, not from its data file).
pub trait LiveRead {
    /// Reads at `offset` until `buf` is full or the volume ends; returns the bytes read.
    fn read_live(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

impl<F: StorageFile> LiveRead for F {
    fn read_live(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read_at(buf, offset)
    }
}

/// Where the re-examined blocks' work stands.
#[derive(Default)]
struct ReexaminePlan {
    /// Runs of blocks to read, sorted, disjoint, none set in the capture set.
    runs: Vec<Range<u64>>,
    /// Next run to hand out, and the next block within it.
    cursor: (usize, u64),
    planned: bool,
}

pub struct Freeze<S: Storage> {
    /// The blocks this snapshot captures (file `captures/<v>-<s>.set`).
    pub blocks: DirtyMap<S>,
    /// Blocks captured whether or not their bit is set.
    pub reexamine: Range<u64>,
    pub size_bytes: u64,
    pub block_size: u64,
    /// Blocks the worker has read: writers no longer preserve them.
    done: Bitmap,
    /// Blocks of `reexamine` a writer has changed since the freeze.
    touched: Bitmap,
    /// Words of `blocks` with bits set, fixed at the freeze: the first work units.
    words: Vec<usize>,
    plan: Mutex<ReexaminePlan>,
    cow: S::File,
    cow_path: PathBuf,
    cow_next: AtomicU64,
    preserved: Vec<Mutex<Records>>,
    /// First failure to preserve a page; the snapshot then ends in error.
    failure: Mutex<Option<String>>,
}

impl<S: Storage> Freeze<S> {
    pub fn new(
        blocks: DirtyMap<S>,
        reexamine: Range<u64>,
        size_bytes: u64,
        block_size: u64,
        cow: S::File,
        cow_path: &Path,
    ) -> Freeze<S> {
        let words = blocks.nonzero_words();
        Freeze {
            blocks,
            reexamine,
            size_bytes,
            block_size,
            done: Bitmap::new(),
            touched: Bitmap::new(),
            words,
            plan: Mutex::new(ReexaminePlan::default()),
            cow,
            cow_path: cow_path.to_path_buf(),
            cow_next: AtomicU64::new(0),
            preserved: (0..SHARDS).map(|_| Mutex::new(Records::new())).collect(),
            failure: Mutex::new(None),
        }
    }

    /// The freeze of a capture a `kill -9` interrupted, from its files: the capture
    /// set, and the preservation file, whose whole slots are read back (a torn or
    /// never-written one is skipped; new slots go after the last). `done`: blocks
    /// whose entries are committed. Blocks of the re-examined range with preserved
    /// pages count as touched (a punch since the freeze may have made them holes).
    pub fn reopen(
        blocks: DirtyMap<S>,
        reexamine: Range<u64>,
        size_bytes: u64,
        block_size: u64,
        cow: S::File,
        cow_path: &Path,
        done: impl IntoIterator<Item = u64>,
    ) -> io::Result<Freeze<S>> {
        let freeze = Freeze::new(blocks, reexamine, size_bytes, block_size, cow, cow_path);
        let len = freeze.cow.len()?;
        let slots = len.div_ceil(SLOT_BYTES);
        let mut buf = vec![0u8; (SLOT_BYTES * 256) as usize];
        let mut slot = 0;
        while slot < slots {
            let count = (slots - slot).min(256);
            let bytes = &mut buf[..(count * SLOT_BYTES) as usize];
            let n = freeze.cow.read_at(bytes, slot * SLOT_BYTES)?;
            bytes[n..].fill(0);
            for (i, chunk) in bytes.chunks(SLOT_BYTES as usize).enumerate() {
                if let Some(page) = open_slot(chunk) {
                    let block = page * PAGE / block_size;
                    let offset = (slot + i as u64) * SLOT_BYTES + SLOT_HEADER;
                    freeze.records(block).entry(page).or_insert(offset);
                    if freeze.reexamine.contains(&block) {
                        freeze.touched.set(block);
                    }
                }
            }
            slot += count;
        }
        freeze.cow_next.store(slots * SLOT_BYTES, Ordering::Relaxed);
        for block in done {
            freeze.done.set(block);
        }
        Ok(freeze)
    }

    pub fn cow_path(&self) -> &Path {
        &self.cow_path
    }

    /// Whether `block`'s entry is committed (see the module documentation).
    pub fn is_done(&self, block: u64) -> bool {
        self.done.get(block)
    }

    /// Records that the entries of `blocks` are committed: writers stop preserving
    /// them, and readers of the pending image read the entries.
    pub fn mark_done(&self, blocks: impl IntoIterator<Item = u64>) {
        for block in blocks {
            self.done.set(block);
        }
    }

    /// Whether the capture reads `block` from the frozen view (it is in the capture
    /// set or the re-examined range); other blocks are as the base snapshot has them.
    pub fn is_frozen(&self, block: u64) -> bool {
        self.blocks.is_set(block) || self.reexamine.contains(&block)
    }

    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

    /// Blocks of the capture set proper (not counting re-examined ones).
    pub fn marked_blocks(&self) -> u64 {
        self.blocks.count()
    }

    /// Decides which re-examined blocks the capture reads: the live file's data
    /// extents, the blocks writers touched since the freeze, and `also` (blocks an
    /// older snapshot holds data in, which a hole now may have replaced). Every other
    /// block of the range read as zeros at the freeze and is skipped without I/O.
    /// Returns how many blocks the capture reads in all.
    pub fn plan_reexamine(
        &self,
        live: &S::File,
        also: impl IntoIterator<Item = u64>,
    ) -> io::Result<u64> {
        let range = self.reexamine.clone();
        let mut runs: Vec<Range<u64>> = Vec::new();
        if !range.is_empty() {
            let bs = self.block_size;
            let end_bytes = (range.end * bs).min(self.size_bytes);
            let mut pos = range.start * bs;
            // The extents first, the touched blocks after: see the module documentation.
            while pos < end_bytes {
                let Some(data) = live.seek_data(pos)? else {
                    break;
                };
                if data >= end_bytes {
                    break;
                }
                let hole = live.seek_hole(data)?.min(end_bytes);
                runs.push(data / bs..hole.div_ceil(bs));
                pos = hole.max(data + 1);
            }
            let extra = self
                .touched
                .ones_in(range.clone())
                .into_iter()
                .chain(also.into_iter().filter(|b| range.contains(b)))
                .map(|b| b..b + 1);
            runs.extend(extra);
        }
        let runs = split_out_marked(merge_runs(runs), &self.blocks);
        let count = runs.iter().map(|r| r.end - r.start).sum::<u64>() + self.blocks.count();
        let mut plan = lock(&self.plan);
        *plan = ReexaminePlan {
            runs,
            cursor: (0, 0),
            planned: true,
        };
        Ok(count)
    }

    /// Number of work units of the capture set proper: one per word of set bits.
    pub fn marked_units(&self) -> usize {
        self.words.len()
    }

    /// The blocks of marked unit `unit` (one word of the capture set).
    pub fn marked_unit_blocks(&self, unit: usize) -> Vec<u64> {
        self.words
            .get(unit)
            .map(|&w| self.blocks.blocks_in_word(w).collect())
            .unwrap_or_default()
    }

    /// The next re-examined blocks to read (at most [`UNIT_BLOCKS`]), or an empty
    /// list when none are left. [`Freeze::plan_reexamine`] must have run.
    pub fn next_reexamined(&self) -> Vec<u64> {
        let mut plan = lock(&self.plan);
        debug_assert!(plan.planned || self.reexamine.is_empty());
        let (index, next) = plan.cursor;
        let Some(run) = plan.runs.get(index).cloned() else {
            return Vec::new();
        };
        let start = next.max(run.start);
        let end = (start + UNIT_BLOCKS).min(run.end);
        plan.cursor = if end == run.end {
            (index + 1, 0)
        } else {
            (index, end)
        };
        (start..end).collect()
    }

    /// Asks for `blocks` (sorted) to be read from the live file ahead of need, so a
    /// capture of data that is not cached overlaps disk reads with hashing.
    pub fn prefetch(&self, live: &S::File, blocks: &[u64]) {
        let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
            return;
        };
        let start = first * self.block_size;
        let end = ((last + 1) * self.block_size).min(self.size_bytes);
        if end > start {
            live.will_need(start, end - start);
        }
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
        lock(&self.preserved[(block % SHARDS as u64) as usize])
    }

    /// Reads `[offset, offset + buf.len())` of the live file as the frozen view shows
    /// it: zeros past the frozen size (and past the live end of file).
    fn read_frozen<L: LiveRead + ?Sized>(
        &self,
        live: &L,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<()> {
        let valid = self.size_bytes.saturating_sub(offset).min(buf.len() as u64) as usize;
        let read = live.read_live(&mut buf[..valid], offset)?;
        buf[read..].fill(0);
        Ok(())
    }

    /// Called before bytes `[start, end)` of the live file change. Returns once the
    /// frozen contents of every page they touch in a block not yet captured are
    /// safe. A failure to preserve is recorded (the snapshot will end in error) but
    /// never fails the write: the volume comes first.
    pub fn protect<L: LiveRead + ?Sized>(&self, live: &L, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let bs = self.block_size;
        for block in self.captured_blocks_in(start / bs, (end - 1) / bs) {
            if self.done.get(block) {
                continue;
            }
            if self.reexamine.contains(&block) {
                self.touched.set(block);
            }
            let block_start = block * bs;
            let first_page = start.max(block_start) / PAGE;
            let end_page = end.min(block_start + bs).div_ceil(PAGE);
            if let Err(e) = self.preserve(live, block, first_page..end_page) {
                lock(&self.failure).get_or_insert_with(|| {
                    format!("cannot preserve block {block} before a write: {e}")
                });
            }
        }
    }

    /// Copies the pages of `pages` (all in `block`) not yet preserved.
    fn preserve<L: LiveRead + ?Sized>(
        &self,
        live: &L,
        block: u64,
        pages: Range<u64>,
    ) -> io::Result<()> {
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
            let pages_in_run = run_end - page;
            let mut frozen = vec![0u8; (pages_in_run * PAGE) as usize];
            self.read_frozen(live, &mut frozen, page * PAGE)?;
            let mut slots = vec![0u8; (pages_in_run * SLOT_BYTES) as usize];
            for (i, (slot, data)) in slots
                .chunks_mut(SLOT_BYTES as usize)
                .zip(frozen.chunks(PAGE as usize))
                .enumerate()
            {
                slot[SLOT_HEADER as usize..].copy_from_slice(data);
                seal_slot(slot, page + i as u64);
            }
            let offset = self
                .cow_next
                .fetch_add(slots.len() as u64, Ordering::Relaxed);
            // Returns before the write this protects is issued (see the module docs).
            self.cow.write_all_at(&slots, offset)?;
            for (i, p) in (page..run_end).enumerate() {
                records.insert(p, offset + i as u64 * SLOT_BYTES + SLOT_HEADER);
            }
            page = run_end;
        }
        Ok(())
    }

    /// The frozen contents of `block`, for the capture worker or a reader of the
    /// pending image, into `buf` (resized to one block). Exact until the block is done
    /// (see the module documentation).
    pub fn take_into<L: LiveRead + ?Sized>(
        &self,
        live: &L,
        block: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
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
            let n = self.cow.read_at(&mut buf[at..at + PAGE as usize], offset)?;
            if n != PAGE as usize {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("preserved page {page} is cut short"),
                ));
            }
        }
        Ok(())
    }

    /// [`Freeze::take_into`] a new buffer.
    pub fn take<L: LiveRead + ?Sized>(&self, live: &L, block: u64) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.take_into(live, block, &mut buf)?;
        Ok(buf)
    }
}

/// Sorts and merges overlapping or adjacent runs.
fn merge_runs(mut runs: Vec<Range<u64>>) -> Vec<Range<u64>> {
    runs.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(runs.len());
    for run in runs {
        match merged.last_mut() {
            Some(last) if run.start <= last.end => last.end = last.end.max(run.end),
            _ => merged.push(run),
        }
    }
    merged
}

/// Cuts the blocks set in `marked` out of `runs`: they are captured as marked blocks.
fn split_out_marked<S: Storage>(runs: Vec<Range<u64>>, marked: &DirtyMap<S>) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for run in runs {
        let mut start = run.start;
        for b in run.clone() {
            if marked.is_set(b) {
                if b > start {
                    out.push(start..b);
                }
                start = b + 1;
            }
        }
        if start < run.end {
            out.push(start..run.end);
        }
    }
    out
}

#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use super::*;
    use crate::storage::OpenOptions;
    use crate::storage::memory::{MemFile, MemStorage};
    use std::sync::Arc;

    /// Four pages per block, to exercise partial preservation.
    const BS: u64 = 4 * PAGE;

    fn setup(blocks: &[u64]) -> (MemFile, Freeze<MemStorage>) {
        setup_with(blocks, 0..0, |live| {
            for b in 0..8u64 {
                live.write_all_at(&vec![b as u8 + 1; BS as usize], b * BS)
                    .unwrap();
            }
        })
    }

    fn setup_with(
        blocks: &[u64],
        reexamine: Range<u64>,
        fill: impl FnOnce(&MemFile),
    ) -> (MemFile, Freeze<MemStorage>) {
        let storage = MemStorage::new();
        storage.create_dir_all(Path::new("/t")).unwrap();
        let live = storage
            .open(Path::new("/t/live"), OpenOptions::CREATE)
            .unwrap();
        fill(&live);
        let set = DirtyMap::create(
            &storage,
            Path::new("/t/set"),
            crate::volume::dirty::NEVER_SHRUNK,
        )
        .unwrap();
        for &b in blocks {
            set.mark(b, b).unwrap();
        }
        let cow_path = Path::new("/t/cow");
        let cow = storage.open(cow_path, OpenOptions::TRUNCATE).unwrap();
        let freeze = Freeze::new(set, reexamine, 7 * BS + 100, BS, cow, cow_path);
        (live, freeze)
    }

    fn write(live: &MemFile, freeze: &Freeze<MemStorage>, offset: u64, data: &[u8]) {
        freeze.protect(live, offset, offset + data.len() as u64);
        live.write_all_at(data, offset).unwrap();
    }

    #[test]
    fn writes_before_the_capture_keep_the_old_pages_only() {
        let (live, freeze) = setup(&[1, 2]);
        // One unaligned write over pages 1 and 2 of block 1.
        write(&live, &freeze, BS + PAGE + 10, &[0xaa; 5000]);
        assert_eq!(freeze.cow_next.load(Ordering::Relaxed), 2 * SLOT_BYTES);
        assert_eq!(freeze.take(&live, 1).unwrap(), vec![2u8; BS as usize]);
        // Once its entry is committed, writes are no longer preserved.
        freeze.mark_done([1]);
        write(&live, &freeze, BS, &[0xbb; 100]);
        assert_eq!(freeze.cow_next.load(Ordering::Relaxed), 2 * SLOT_BYTES);
        // Untouched block is read live; a block outside the set is never preserved.
        assert_eq!(freeze.take(&live, 2).unwrap(), vec![3u8; BS as usize]);
        write(&live, &freeze, 5 * BS, &[0xcc; 100]);
        assert_eq!(freeze.cow_next.load(Ordering::Relaxed), 2 * SLOT_BYTES);
    }

    #[test]
    fn a_reopened_freeze_has_every_preserved_page_and_skips_torn_slots() {
        let (live, freeze) = setup(&[1, 2, 3]);
        write(&live, &freeze, BS + 10, &[0xaa; 100]);
        write(&live, &freeze, 3 * BS, &[0xbb; BS as usize]);
        let storage = MemStorage::new();
        storage.create_dir_all(Path::new("/t")).unwrap();
        // A copy of the preservation file with a torn slot after the good ones.
        let len = freeze.cow.len().unwrap();
        let mut bytes = vec![0u8; len as usize];
        freeze.cow.read_at(&mut bytes, 0).unwrap();
        let mut torn = bytes[..SLOT_BYTES as usize].to_vec();
        torn[SLOT_BYTES as usize - 1] ^= 1;
        bytes.extend_from_slice(&torn);
        bytes.extend_from_slice(&vec![0u8; SLOT_BYTES as usize]);
        let cow_path = Path::new("/t/cow2");
        let cow = storage.open(cow_path, OpenOptions::CREATE).unwrap();
        cow.write_all_at(&bytes, 0).unwrap();
        let set = DirtyMap::create(
            &storage,
            Path::new("/t/set2"),
            crate::volume::dirty::NEVER_SHRUNK,
        )
        .unwrap();
        for b in [1, 2, 3] {
            set.mark(b, b).unwrap();
        }
        let reopened = Freeze::reopen(set, 0..0, 7 * BS + 100, BS, cow, cow_path, [2]).unwrap();
        assert_eq!(reopened.take(&live, 1).unwrap(), vec![2u8; BS as usize]);
        assert_eq!(reopened.take(&live, 3).unwrap(), vec![4u8; BS as usize]);
        assert!(reopened.is_done(2) && !reopened.is_done(1));
        // New slots go after everything, torn ones included.
        assert_eq!(
            reopened.cow_next.load(Ordering::Relaxed),
            len + 2 * SLOT_BYTES
        );
        write(&live, &reopened, 2 * BS, &[0xcc; 10]);
        assert_eq!(
            reopened.cow_next.load(Ordering::Relaxed),
            len + 2 * SLOT_BYTES,
            "done"
        );
        write(&live, &reopened, BS + 3 * PAGE, &[0xdd; 10]);
        assert_eq!(reopened.take(&live, 1).unwrap(), vec![2u8; BS as usize]);
    }

    #[test]
    fn bytes_past_the_frozen_size_read_as_zero() {
        let (live, freeze) = setup(&[7]);
        write(&live, &freeze, 7 * BS + 50, &[9; 200]);
        let data = freeze.take(&live, 7).unwrap();
        assert_eq!(&data[..100], &[8u8; 100][..]);
        assert!(data[100..].iter().all(|&b| b == 0));
    }

    #[test]
    fn reexamined_ranges_skip_holes_but_not_punched_or_older_data() {
        // Blocks 1 and 5 hold data; block 6 is a hole now but an older snapshot holds
        // data there; block 3 is punched after the freeze (it had data then).
        let (live, freeze) = setup_with(&[2], 0..8, |live| {
            for b in [1u64, 3, 5] {
                live.write_all_at(&vec![b as u8; BS as usize], b * BS)
                    .unwrap();
            }
        });
        freeze.protect(&live, 3 * BS, 4 * BS);
        live.allocate(crate::storage::Allocate::PunchHole, 3 * BS, BS)
            .unwrap();
        let total = freeze.plan_reexamine(&live, [6]).unwrap();
        let mut planned = Vec::new();
        loop {
            let unit = freeze.next_reexamined();
            if unit.is_empty() {
                break;
            }
            planned.extend(unit);
        }
        // Block 2 is marked (captured as such), so it is not re-examined as well.
        assert_eq!(planned, vec![1, 3, 5, 6]);
        assert_eq!(total, 5);
        assert_eq!(freeze.take(&live, 3).unwrap(), vec![3u8; BS as usize]);
    }

    #[test]
    fn racing_writers_and_worker_always_see_the_frozen_block() {
        for round in 0..50u8 {
            let (live, freeze) = setup(&[0, 1, 2, 3, 4, 5, 6]);
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
                    freeze.take(&*live, b).unwrap(),
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

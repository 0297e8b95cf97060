//! [`DirtyMap`]: what changed in a volume since its last snapshot.
//!
//! Two facts are kept:
//! - one bit per block written (or zeroed, punched, truncated across);
//! - the *low-water size*: the smallest size the volume had since the last snapshot.
//!   Blocks past it were cut off by a shrink; if the volume grew back, they read as
//!   zeros now, whatever older snapshots hold there. Keeping a number instead of
//!   marking every cut-off block keeps a shrink O(1).
//!
//! On disk (`volumes/<id>.dirty`, docs/FORMAT.md): a [`HEADER_BYTES`] header — magic,
//! format version, low-water size — then the bitmap as little-endian `u64` words (bit
//! `i` of word `w` is block `64 * w + i`), sparse.
//!
//! **The rule this module keeps: [`DirtyMap::mark`] returns only once every bit it
//! was asked for is in the file.** Not merely set in memory: a second writer to a
//! block whose bit another thread has just set, but not yet written, must not go on
//! to write (and perhaps `fdatasync`) its data while the bit exists only in memory —
//! a `kill -9` then would leave changed data that no snapshot ever captures. So each
//! word has a second, *persisted* bitmap, updated after the word reached the file;
//! a marker whose bits are not all persisted writes the word itself (under the file
//! lock, with the word's current value) before returning. The same holds for the
//! low-water size. "In the file" means the page cache, which survives a `kill -9`;
//! after a host crash the daemon stops trusting dirty maps and compares every block
//! (see `fs::recovery`).

use std::io;
use std::path::{Path, PathBuf};

use crate::storage::{OpenOptions, Storage, StorageFile, parent_of};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{Mutex, MutexGuard, lock};

use super::bitmap::Bitmap;

/// Magic at offset 0 of a dirty map file.
pub const MAGIC: &[u8; 8] = b"EBSDIRTY";
/// Format version at [`VERSION_OFFSET`] (little-endian u32).
pub const VERSION: u32 = 1;
pub const VERSION_OFFSET: usize = 8;
/// Low-water size at [`LOW_WATER_OFFSET`] (little-endian u64).
pub const LOW_WATER_OFFSET: usize = 16;
/// The bitmap words start here.
pub const HEADER_BYTES: u64 = 32;

/// Low-water value meaning "not shrunk since the last snapshot".
pub const NEVER_SHRUNK: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum DirtyMapError {
    #[error("{path}: not a dirty map ({reason})")]
    Damaged { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl DirtyMapError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            DirtyMapError::Damaged { path, .. } | DirtyMapError::Io { path, .. } => path,
        }
    }

    pub fn is_missing(&self) -> bool {
        matches!(self, DirtyMapError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

struct MapFile<S: Storage> {
    file: S::File,
    path: PathBuf,
}

pub struct DirtyMap<S: Storage> {
    bits: Bitmap,
    /// Bits known to be in the file (a subset of `bits`).
    persisted: Bitmap,
    low_water: AtomicU64,
    /// The low-water size the file holds (never below `low_water`).
    low_water_persisted: AtomicU64,
    /// Serialises writes to the file so a stale word never overwrites a newer one.
    file: Mutex<MapFile<S>>,
}

fn word_offset(w: usize) -> u64 {
    HEADER_BYTES + w as u64 * 8
}

fn header(low_water: u64) -> [u8; HEADER_BYTES as usize] {
    let mut header = [0u8; HEADER_BYTES as usize];
    header[..8].copy_from_slice(MAGIC);
    header[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&VERSION.to_le_bytes());
    header[LOW_WATER_OFFSET..LOW_WATER_OFFSET + 8].copy_from_slice(&low_water.to_le_bytes());
    header
}

/// Checks a header; returns the low-water size it holds.
fn parse_header(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() < HEADER_BYTES as usize {
        return Err(format!("{} bytes, shorter than its header", bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&bytes[VERSION_OFFSET..VERSION_OFFSET + 4]);
    let version = u32::from_le_bytes(version);
    if version != VERSION {
        return Err(format!(
            "format version {version}, this ebsfs reads {VERSION}"
        ));
    }
    let mut low_water = [0u8; 8];
    low_water.copy_from_slice(&bytes[LOW_WATER_OFFSET..LOW_WATER_OFFSET + 8]);
    Ok(u64::from_le_bytes(low_water))
}

impl<S: Storage> DirtyMap<S> {
    fn with_file(file: S::File, path: &Path, bits: Bitmap, low_water: u64) -> DirtyMap<S> {
        let persisted = Bitmap::new();
        for w in bits.nonzero_words() {
            persisted.fetch_or(w, bits.word(w));
        }
        DirtyMap {
            bits,
            persisted,
            low_water: AtomicU64::new(low_water),
            low_water_persisted: AtomicU64::new(low_water),
            file: Mutex::new(MapFile {
                file,
                path: path.to_path_buf(),
            }),
        }
    }

    /// A new, empty map at `path`, written and synced but not yet placed in its
    /// directory for good: a freeze renames it into place; [`DirtyMap::create`] is
    /// the whole sequence. `low_water` is the size the volume has now
    /// ([`NEVER_SHRUNK`] for a new volume).
    pub fn create_unpublished(storage: &S, path: &Path, low_water: u64) -> io::Result<DirtyMap<S>> {
        let file = storage.open(path, OpenOptions::TRUNCATE)?;
        file.write_all_at(&header(low_water), 0)?;
        file.sync_data()?;
        Ok(DirtyMap::with_file(file, path, Bitmap::new(), low_water))
    }

    /// A new, empty map at `path`, created whole: written under a temporary name,
    /// synced, renamed into place and the directory synced. A crash leaves either no
    /// map or a valid empty one, never a file without its header.
    pub fn create(storage: &S, path: &Path, low_water: u64) -> io::Result<DirtyMap<S>> {
        let tmp = crate::storage::temp_path(path);
        let map = DirtyMap::create_unpublished(storage, &tmp, low_water)?;
        map.rename(storage, path)?;
        storage.sync_dir(parent_of(path))?;
        Ok(map)
    }

    /// Loads the map stored at `path`. A missing or damaged file is an error: a map
    /// is never invented, since an empty one would claim that nothing changed.
    pub fn open(storage: &S, path: &Path) -> Result<DirtyMap<S>, DirtyMapError> {
        let io_err = |source| DirtyMapError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = storage.open(path, OpenOptions::EXISTING).map_err(io_err)?;
        let len = file.len().map_err(io_err)?;
        let mut head = [0u8; HEADER_BYTES as usize];
        let n = file.read_at(&mut head, 0).map_err(io_err)?;
        let low_water = parse_header(&head[..n]).map_err(|reason| DirtyMapError::Damaged {
            path: path.to_path_buf(),
            reason,
        })?;
        let bits = Bitmap::new();
        let mut offset = HEADER_BYTES;
        let mut buf = vec![0u8; 1 << 20];
        while offset + 8 <= len {
            let want = ((len - offset) as usize).min(buf.len()) / 8 * 8;
            let n = file.read_at(&mut buf[..want], offset).map_err(io_err)? / 8 * 8;
            if n == 0 {
                break;
            }
            let first_word = ((offset - HEADER_BYTES) / 8) as usize;
            for (i, chunk) in buf[..n].chunks_exact(8).enumerate() {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                let word = u64::from_le_bytes(word);
                if word != 0 {
                    bits.fetch_or(first_word + i, word);
                }
            }
            offset += n as u64;
        }
        Ok(DirtyMap::with_file(file, path, bits, low_water))
    }

    fn lock_file(&self) -> MutexGuard<'_, MapFile<S>> {
        lock(&self.file)
    }

    pub fn path(&self) -> PathBuf {
        self.lock_file().path.clone()
    }

    /// Moves the backing file; the map keeps using it under its new name.
    pub fn rename(&self, storage: &S, to: &Path) -> io::Result<()> {
        let mut file = self.lock_file();
        storage.rename(&file.path, to)?;
        file.path = to.to_path_buf();
        Ok(())
    }

    /// Marks blocks `first..=last`; returns once the bits are in the file.
    pub fn mark(&self, first: u64, last: u64) -> io::Result<()> {
        debug_assert!(first <= last);
        let (first_word, last_word) = ((first / 64) as usize, (last / 64) as usize);
        let mut unpersisted = Vec::new();
        for w in first_word..=last_word {
            let lo = if w == first_word { first % 64 } else { 0 };
            let hi = if w == last_word { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            self.bits.fetch_or(w, mask);
            // Set in memory is not enough: see the module documentation.
            if self.persisted.word(w) & mask != mask {
                unpersisted.push(w);
            }
        }
        self.persist_words(&unpersisted)
    }

    /// Records that the volume was cut to `size_bytes`; returns once the file says so.
    pub fn note_shrink(&self, size_bytes: u64) -> io::Result<()> {
        self.low_water.fetch_min(size_bytes, Ordering::AcqRel);
        if self.low_water_persisted.load(Ordering::Acquire) > size_bytes {
            let file = self.lock_file();
            let low_water = self.low_water.load(Ordering::Acquire);
            file.file.write_all_at(&header(low_water), 0)?;
            self.low_water_persisted
                .fetch_min(low_water, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Raises the low-water size to `size_bytes` (nothing if it is that high
    /// already); returns once the file says so. The file changes before memory, so
    /// whoever reads the new value may rely on it being in the file.
    ///
    /// Only for a caller that knows every block in between to be what the number
    /// claims (for a dirty map: equal to the snapshot it is incremental against; for
    /// a present map: to be read from the source), and that keeps every other change
    /// of this map's low-water size out for the duration ([`DirtyMap::note_shrink`]
    /// running concurrently could be lost).
    pub fn raise_low_water(&self, size_bytes: u64) -> io::Result<()> {
        let file = self.lock_file();
        if self.low_water.load(Ordering::Acquire) >= size_bytes {
            return Ok(());
        }
        file.file.write_all_at(&header(size_bytes), 0)?;
        self.low_water_persisted
            .store(size_bytes, Ordering::Release);
        self.low_water.store(size_bytes, Ordering::Release);
        Ok(())
    }

    /// The smallest size since the last snapshot, or [`NEVER_SHRUNK`].
    pub fn low_water(&self) -> u64 {
        self.low_water.load(Ordering::Acquire)
    }

    /// Writes the current value of each word in `words` (sorted) to the file, then
    /// records them as persisted.
    fn persist_words(&self, words: &[usize]) -> io::Result<()> {
        if words.is_empty() {
            return Ok(());
        }
        let file = self.lock_file();
        // Read the words under the file lock: whoever writes last writes current values.
        let mut start = 0;
        while start < words.len() {
            let mut end = start + 1;
            while end < words.len() && words[end] == words[end - 1] + 1 {
                end += 1;
            }
            let values: Vec<u64> = words[start..end]
                .iter()
                .map(|&w| self.bits.word(w))
                .collect();
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            file.file.write_all_at(&bytes, word_offset(words[start]))?;
            for (&w, &value) in words[start..end].iter().zip(&values) {
                self.persisted.fetch_or(w, value);
            }
            start = end;
        }
        Ok(())
    }

    /// Makes the map durable against a host crash.
    pub fn sync(&self) -> io::Result<()> {
        self.lock_file().file.sync_data()
    }

    pub fn is_set(&self, block: u64) -> bool {
        self.bits.get(block)
    }

    /// Whether `block`'s bit is in the file, not only in memory: what a decision that
    /// lets a write go on without taking the bit's lock must look at.
    pub fn is_set_in_file(&self, block: u64) -> bool {
        self.persisted.get(block)
    }

    pub fn count(&self) -> u64 {
        self.bits.count_ones()
    }

    /// Number of set blocks in `blocks`.
    pub fn count_in(&self, blocks: std::ops::Range<u64>) -> u64 {
        self.bits.count_in(blocks)
    }

    /// Indices of the 64-block words with any block set, in order.
    pub fn nonzero_words(&self) -> Vec<usize> {
        self.bits.nonzero_words()
    }

    /// The set blocks of word `w`, in order.
    pub fn blocks_in_word(&self, w: usize) -> impl Iterator<Item = u64> + use<S> {
        let mut bits = self.bits.word(w);
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let bit = bits.trailing_zeros();
            bits &= bits - 1;
            Some(w as u64 * 64 + u64::from(bit))
        })
    }

    /// Every set block, in order.
    pub fn blocks(&self) -> Vec<u64> {
        self.nonzero_words()
            .into_iter()
            .flat_map(|w| self.blocks_in_word(w))
            .collect()
    }

    /// Adds everything `other` records to this map (and its file).
    pub fn merge(&self, other: &DirtyMap<S>) -> io::Result<()> {
        let words = other.nonzero_words();
        for &w in &words {
            self.bits.fetch_or(w, other.bits.word(w));
        }
        self.persist_words(&words)?;
        self.note_shrink(other.low_water())
    }

    /// Marks every block below `blocks` (used when the map's contents are lost).
    pub fn mark_all(&self, blocks: u64) -> io::Result<()> {
        if blocks > 0 {
            self.mark(0, blocks - 1)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::{CrashMode, MemStorage};

    fn setup() -> (MemStorage, PathBuf) {
        let storage = MemStorage::new();
        storage.create_dir_all(Path::new("/v")).unwrap();
        (storage, PathBuf::from("/v/1.dirty"))
    }

    #[test]
    fn marks_survive_reopen() {
        let (storage, path) = setup();
        let map = DirtyMap::create(&storage, &path, NEVER_SHRUNK).unwrap();
        map.mark(3, 3).unwrap();
        map.mark(60, 70).unwrap();
        map.mark(1000, 1000).unwrap();
        map.mark(1 << 30, 1 << 30).unwrap();
        assert_eq!(map.count(), 1 + 11 + 1 + 1);
        drop(map);
        let map = DirtyMap::open(&storage, &path).unwrap();
        let expect: Vec<u64> = [3]
            .into_iter()
            .chain(60..=70)
            .chain([1000, 1 << 30])
            .collect();
        assert_eq!(map.blocks(), expect);
        assert!(map.is_set(64) && !map.is_set(71) && !map.is_set(1_000_000));
        assert_eq!(map.low_water(), NEVER_SHRUNK);
    }

    #[test]
    fn shrinks_keep_the_lowest_size_and_damage_is_refused() {
        let (storage, path) = setup();
        let map = DirtyMap::create(&storage, &path, 1 << 20).unwrap();
        map.note_shrink(4096).unwrap();
        map.note_shrink(8192).unwrap();
        assert_eq!(DirtyMap::open(&storage, &path).unwrap().low_water(), 4096);
        for bad in [&b""[..], b"garbage", &[0u8; 64]] {
            crate::storage::publish_file(&storage, &path, bad).unwrap();
            let err = DirtyMap::open(&storage, &path).err().unwrap();
            assert!(matches!(err, DirtyMapError::Damaged { .. }), "{err}");
        }
        storage.remove_file(&path).unwrap();
        assert!(DirtyMap::open(&storage, &path).err().unwrap().is_missing());
    }

    #[test]
    fn a_raised_low_water_size_is_in_the_file_and_shrinks_still_lower_it() {
        let (storage, path) = setup();
        let map = DirtyMap::create(&storage, &path, 4096).unwrap();
        map.raise_low_water(1 << 20).unwrap();
        assert_eq!(map.low_water(), 1 << 20);
        assert_eq!(
            DirtyMap::open(&storage, &path).unwrap().low_water(),
            1 << 20
        );
        // Never lowers.
        map.raise_low_water(8192).unwrap();
        assert_eq!(map.low_water(), 1 << 20);
        // A shrink after a raise reaches the file again.
        map.note_shrink(12288).unwrap();
        assert_eq!(DirtyMap::open(&storage, &path).unwrap().low_water(), 12288);
    }

    #[test]
    fn merge_and_rename() {
        let (storage, _) = setup();
        let a = DirtyMap::create(&storage, Path::new("/v/a"), NEVER_SHRUNK).unwrap();
        let b = DirtyMap::create(&storage, Path::new("/v/b"), 300).unwrap();
        a.mark(1, 2).unwrap();
        b.mark(2, 200).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.count(), 200);
        assert_eq!(a.low_water(), 300);
        a.rename(&storage, Path::new("/v/c")).unwrap();
        a.mark(500, 500).unwrap();
        let reopened = DirtyMap::open(&storage, Path::new("/v/c")).unwrap();
        assert_eq!(reopened.count(), 201);
        assert_eq!(reopened.low_water(), 300);
        assert_eq!(storage.file_len(Path::new("/v/a")).unwrap(), None);
    }

    #[test]
    fn creation_is_whole_at_every_crash_point() {
        // Fault: a map was created with O_TRUNC and its header written afterwards; a
        // crash in between left a 0-byte file that no later start could open.
        for crash_at in 1..8 {
            let (storage, path) = setup();
            storage.crash_after(crash_at);
            let created = DirtyMap::create(&storage, &path, NEVER_SHRUNK).is_ok();
            let storage = storage.restart(CrashMode::Process);
            match DirtyMap::open(&storage, &path) {
                Ok(map) => assert_eq!(map.count(), 0),
                Err(e) => assert!(
                    e.is_missing() && !created,
                    "crash at {crash_at}: {e} (created: {created})"
                ),
            }
        }
    }

    #[test]
    fn concurrent_marks_all_reach_the_file() {
        let (storage, path) = setup();
        let map = std::sync::Arc::new(DirtyMap::create(&storage, &path, NEVER_SHRUNK).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let map = map.clone();
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        map.mark(i * 4 + t, i * 4 + t).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(DirtyMap::open(&storage, &path).unwrap().count(), 8000);
    }
}

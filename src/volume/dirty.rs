//! [`DirtyMap`]: which blocks of a volume changed since its last snapshot.
//!
//! One bit per block, in memory as atomic words and on disk in a file of little-endian
//! `u64` words (bit `i` of word `w` is block `64 * w + i`). A bit reaches the file
//! (page cache) *before* the write it covers reaches the data file, so after a
//! `kill -9` the file is a superset of what changed. Only a host crash can lose bits
//! the data file kept; the daemon detects that case at start-up and falls back to
//! comparing every block (see `fs::recovery`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

pub struct DirtyMap {
    words: RwLock<Vec<AtomicU64>>,
    /// Serialises writes to the file so a stale word never overwrites a newer one.
    file: Mutex<(File, PathBuf)>,
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

impl DirtyMap {
    /// A new, empty map backed by a fresh file at `path`.
    pub fn create(path: &Path) -> io::Result<DirtyMap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(DirtyMap {
            words: RwLock::new(Vec::new()),
            file: Mutex::new((file, path.to_path_buf())),
        })
    }

    /// Loads the map stored at `path`, creating an empty one if there is none.
    pub fn open(path: &Path) -> io::Result<DirtyMap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len() as usize;
        let mut bytes = vec![0u8; len - len % 8];
        file.read_exact_at(&mut bytes, 0)?;
        let words = bytes
            .chunks_exact(8)
            .map(|w| AtomicU64::new(u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))))
            .collect();
        Ok(DirtyMap {
            words: RwLock::new(words),
            file: Mutex::new((file, path.to_path_buf())),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Moves the backing file; the map keeps using it under its new name.
    pub fn rename(&self, to: &Path) -> io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        std::fs::rename(&file.1, to)?;
        file.1 = to.to_path_buf();
        Ok(())
    }

    fn ensure_words(&self, count: usize) {
        if read_lock(&self.words).len() >= count {
            return;
        }
        let mut words = self.words.write().unwrap_or_else(|p| p.into_inner());
        while words.len() < count {
            words.push(AtomicU64::new(0));
        }
    }

    /// Marks blocks `first..=last`; returns once the bits are in the file.
    pub fn mark(&self, first: u64, last: u64) -> io::Result<()> {
        debug_assert!(first <= last);
        let (first_word, last_word) = ((first / 64) as usize, (last / 64) as usize);
        self.ensure_words(last_word + 1);
        let words = read_lock(&self.words);
        let mut changed = false;
        for w in first_word..=last_word {
            let lo = if w == first_word { first % 64 } else { 0 };
            let hi = if w == last_word { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            let old = words[w].fetch_or(mask, Ordering::AcqRel);
            changed |= old & mask != mask;
        }
        if changed {
            self.persist(&words, first_word, last_word)?;
        }
        Ok(())
    }

    /// Marks every block below `block_count`.
    pub fn mark_all(&self, block_count: u64) -> io::Result<()> {
        if block_count > 0 {
            self.mark(0, block_count - 1)?;
        }
        Ok(())
    }

    fn persist(&self, words: &[AtomicU64], first_word: usize, last_word: usize) -> io::Result<()> {
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // Read the words under the file lock: whoever writes last writes current values.
        let bytes: Vec<u8> = words[first_word..=last_word]
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect();
        file.0.write_all_at(&bytes, first_word as u64 * 8)
    }

    pub fn is_set(&self, block: u64) -> bool {
        read_lock(&self.words)
            .get((block / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (block % 64)) != 0)
    }

    pub fn count(&self) -> u64 {
        read_lock(&self.words)
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Number of 64-block words; blocks at or past `64 * word_count()` are clean.
    pub fn word_count(&self) -> usize {
        read_lock(&self.words).len()
    }

    /// The set blocks of word `w`, in order.
    pub fn blocks_in_word(&self, w: usize) -> impl Iterator<Item = u64> {
        let mut bits = read_lock(&self.words)
            .get(w)
            .map_or(0, |x| x.load(Ordering::Acquire));
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
        (0..self.word_count())
            .flat_map(|w| self.blocks_in_word(w))
            .collect()
    }

    /// Adds every bit of `other` to this map (and its file).
    pub fn merge(&self, other: &DirtyMap) -> io::Result<()> {
        let theirs = read_lock(&other.words);
        self.ensure_words(theirs.len());
        let mine = read_lock(&self.words);
        for (dst, src) in mine.iter().zip(theirs.iter()) {
            dst.fetch_or(src.load(Ordering::Acquire), Ordering::AcqRel);
        }
        if !mine.is_empty() {
            self.persist(&mine, 0, mine.len() - 1)?;
        }
        Ok(())
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let map = DirtyMap::create(&path).unwrap();
        map.mark(3, 3).unwrap();
        map.mark(60, 70).unwrap();
        map.mark(1000, 1000).unwrap();
        assert_eq!(map.count(), 1 + 11 + 1);
        drop(map);
        let map = DirtyMap::open(&path).unwrap();
        let expect: Vec<u64> = [3].into_iter().chain(60..=70).chain([1000]).collect();
        assert_eq!(map.blocks(), expect);
        assert!(map.is_set(64) && !map.is_set(71) && !map.is_set(1_000_000));
    }

    #[test]
    fn merge_and_rename() {
        let dir = tempfile::tempdir().unwrap();
        let a = DirtyMap::create(&dir.path().join("a")).unwrap();
        let b = DirtyMap::create(&dir.path().join("b")).unwrap();
        a.mark(1, 2).unwrap();
        b.mark(2, 200).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.count(), 200);
        a.rename(&dir.path().join("c")).unwrap();
        a.mark(500, 500).unwrap();
        let reopened = DirtyMap::open(&dir.path().join("c")).unwrap();
        assert_eq!(reopened.count(), 201);
        assert!(!dir.path().join("a").exists());
    }

    #[test]
    fn concurrent_marks_all_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let map = std::sync::Arc::new(DirtyMap::create(&path).unwrap());
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
        assert_eq!(DirtyMap::open(&path).unwrap().count(), 8000);
    }
}

//! [`DirtyMap`]: what changed in a volume since its last snapshot.
//!
//! Two facts are kept:
//! - one bit per block written (or zeroed, punched, truncated across);
//! - the *low-water size*: the smallest size the volume had since the last snapshot.
//!   Blocks past it were cut off by a shrink; if the volume grew back, they read as
//!   zeros now, whatever older snapshots hold there. Keeping a number instead of
//!   marking every cut-off block keeps a shrink O(1).
//!
//! On disk (`volumes/<id>.dirty`): a 16-byte header — magic `EBSDIRT1`, low-water
//! size (little-endian u64, `u64::MAX` = never shrunk) — then the bitmap as
//! little-endian `u64` words (bit `i` of word `w` is block `64 * w + i`), sparse.
//! A bit reaches the file (page cache) *before* the write it covers reaches the data
//! file, so after a `kill -9` the file is a superset of what changed. Only a host crash
//! can lose bits the data file kept; the daemon detects that case at start-up and
//! falls back to comparing every block (see `fs::recovery`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::bitmap::Bitmap;

const MAGIC: &[u8; 8] = b"EBSDIRT1";
const HEADER_BYTES: u64 = 16;

/// Low-water value meaning "not shrunk since the last snapshot".
pub const NEVER_SHRUNK: u64 = u64::MAX;

pub struct DirtyMap {
    bits: Bitmap,
    low_water: AtomicU64,
    /// Serialises writes to the file so a stale word never overwrites a newer one.
    file: Mutex<(File, PathBuf)>,
}

fn word_offset(w: usize) -> u64 {
    HEADER_BYTES + w as u64 * 8
}

impl DirtyMap {
    /// A new, empty map backed by a fresh file at `path`; `low_water` is the size
    /// the volume has now ([`NEVER_SHRUNK`] for a new volume).
    pub fn create(path: &Path, low_water: u64) -> io::Result<DirtyMap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let map = DirtyMap {
            bits: Bitmap::new(),
            low_water: AtomicU64::new(low_water),
            file: Mutex::new((file, path.to_path_buf())),
        };
        map.persist_header()?;
        Ok(map)
    }

    /// Loads the map stored at `path`, creating an empty one if there is none.
    pub fn open(path: &Path) -> io::Result<DirtyMap> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return DirtyMap::create(path, NEVER_SHRUNK);
            }
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        let mut header = [0u8; HEADER_BYTES as usize];
        if len < HEADER_BYTES
            || file.read_exact_at(&mut header, 0).is_err()
            || &header[..8] != MAGIC
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a dirty map (bad header)", path.display()),
            ));
        }
        let mut low_water_bytes = [0u8; 8];
        low_water_bytes.copy_from_slice(&header[8..16]);
        let bits = Bitmap::new();
        let mut offset = HEADER_BYTES;
        let mut buf = vec![0u8; 1 << 20];
        while offset + 8 <= len {
            let n = ((len - offset) as usize).min(buf.len()) / 8 * 8;
            file.read_exact_at(&mut buf[..n], offset)?;
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
        Ok(DirtyMap {
            bits,
            low_water: AtomicU64::new(u64::from_le_bytes(low_water_bytes)),
            file: Mutex::new((file, path.to_path_buf())),
        })
    }

    fn lock_file(&self) -> std::sync::MutexGuard<'_, (File, PathBuf)> {
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist_header(&self) -> io::Result<()> {
        let file = self.lock_file();
        let mut header = [0u8; HEADER_BYTES as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&self.low_water.load(Ordering::Acquire).to_le_bytes());
        file.0.write_all_at(&header, 0)
    }

    pub fn path(&self) -> PathBuf {
        self.lock_file().1.clone()
    }

    /// Moves the backing file; the map keeps using it under its new name.
    pub fn rename(&self, to: &Path) -> io::Result<()> {
        let mut file = self.lock_file();
        std::fs::rename(&file.1, to)?;
        file.1 = to.to_path_buf();
        Ok(())
    }

    /// Marks blocks `first..=last`; returns once the bits are in the file.
    pub fn mark(&self, first: u64, last: u64) -> io::Result<()> {
        debug_assert!(first <= last);
        let (first_word, last_word) = ((first / 64) as usize, (last / 64) as usize);
        let mut changed = Vec::new();
        for w in first_word..=last_word {
            let lo = if w == first_word { first % 64 } else { 0 };
            let hi = if w == last_word { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            if self.bits.fetch_or(w, mask) & mask != mask {
                changed.push(w);
            }
        }
        self.persist_words(&changed)
    }

    /// Records that the volume was cut to `size_bytes`.
    pub fn note_shrink(&self, size_bytes: u64) -> io::Result<()> {
        if self.low_water.fetch_min(size_bytes, Ordering::AcqRel) > size_bytes {
            self.persist_header()?;
        }
        Ok(())
    }

    /// The smallest size since the last snapshot, or [`NEVER_SHRUNK`].
    pub fn low_water(&self) -> u64 {
        self.low_water.load(Ordering::Acquire)
    }

    /// Writes the current value of each word in `words` (sorted) to the file.
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
            let bytes: Vec<u8> = words[start..end]
                .iter()
                .flat_map(|&w| self.bits.word(w).to_le_bytes())
                .collect();
            file.0.write_all_at(&bytes, word_offset(words[start]))?;
            start = end;
        }
        Ok(())
    }

    pub fn is_set(&self, block: u64) -> bool {
        self.bits.get(block)
    }

    pub fn count(&self) -> u64 {
        self.bits.count_ones()
    }

    /// Indices of the 64-block words with any block set, in order.
    pub fn nonzero_words(&self) -> Vec<usize> {
        self.bits.nonzero_words()
    }

    /// The set blocks of word `w`, in order.
    pub fn blocks_in_word(&self, w: usize) -> impl Iterator<Item = u64> + use<> {
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
    pub fn merge(&self, other: &DirtyMap) -> io::Result<()> {
        let words = other.nonzero_words();
        for &w in &words {
            self.bits.fetch_or(w, other.bits.word(w));
        }
        self.persist_words(&words)?;
        self.note_shrink(other.low_water())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let map = DirtyMap::create(&path, NEVER_SHRUNK).unwrap();
        map.mark(3, 3).unwrap();
        map.mark(60, 70).unwrap();
        map.mark(1000, 1000).unwrap();
        map.mark(1 << 30, 1 << 30).unwrap();
        assert_eq!(map.count(), 1 + 11 + 1 + 1);
        drop(map);
        let map = DirtyMap::open(&path).unwrap();
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
    fn shrinks_keep_the_lowest_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let map = DirtyMap::create(&path, 1 << 20).unwrap();
        map.note_shrink(4096).unwrap();
        map.note_shrink(8192).unwrap();
        assert_eq!(DirtyMap::open(&path).unwrap().low_water(), 4096);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(DirtyMap::open(&path).is_err());
    }

    #[test]
    fn merge_and_rename() {
        let dir = tempfile::tempdir().unwrap();
        let a = DirtyMap::create(&dir.path().join("a"), NEVER_SHRUNK).unwrap();
        let b = DirtyMap::create(&dir.path().join("b"), 300).unwrap();
        a.mark(1, 2).unwrap();
        b.mark(2, 200).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.count(), 200);
        assert_eq!(a.low_water(), 300);
        a.rename(&dir.path().join("c")).unwrap();
        a.mark(500, 500).unwrap();
        let reopened = DirtyMap::open(&dir.path().join("c")).unwrap();
        assert_eq!(reopened.count(), 201);
        assert_eq!(reopened.low_water(), 300);
        assert!(!dir.path().join("a").exists());
    }

    #[test]
    fn concurrent_marks_all_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let map = std::sync::Arc::new(DirtyMap::create(&path, NEVER_SHRUNK).unwrap());
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

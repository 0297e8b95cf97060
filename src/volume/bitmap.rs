//! [`Bitmap`]: a sparse, growable bitmap of atomic words.
//!
//! Memory follows what was touched, not the highest index: words live in pages of
//! [`PAGE_WORDS`] that are allocated on first set. A write at the end of a huge sparse
//! volume costs one page, not a bit for every block before it. Bit operations are
//! lock-free once a page exists; allocating a page takes a short write lock.

use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{RwLock, RwLockReadGuard, read, write};

/// Words per page: 512 words = 32768 bits = 4 KiB.
pub const PAGE_WORDS: usize = 512;

type Page = Box<[AtomicU64]>;

pub struct Bitmap {
    pages: RwLock<Vec<Option<Page>>>,
}

impl Default for Bitmap {
    fn default() -> Bitmap {
        Bitmap::new()
    }
}

fn new_page() -> Page {
    (0..PAGE_WORDS).map(|_| AtomicU64::new(0)).collect()
}

impl Bitmap {
    pub fn new() -> Bitmap {
        Bitmap {
            pages: RwLock::new(Vec::new()),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<Option<Page>>> {
        read(&self.pages)
    }

    fn ensure_page(&self, page: usize) {
        if self.read().get(page).is_some_and(Option::is_some) {
            return;
        }
        let mut pages = write(&self.pages);
        if pages.len() <= page {
            pages.resize_with(page + 1, || None);
        }
        pages[page].get_or_insert_with(new_page);
    }

    /// ORs `mask` into word `w`; returns the previous value.
    pub fn fetch_or(&self, w: usize, mask: u64) -> u64 {
        let page = w / PAGE_WORDS;
        self.ensure_page(page);
        match &self.read()[page] {
            Some(words) => words[w % PAGE_WORDS].fetch_or(mask, Ordering::AcqRel),
            None => unreachable!("page {page} was just allocated"),
        }
    }

    /// Word `w` (zero where nothing was ever set).
    pub fn word(&self, w: usize) -> u64 {
        self.read()
            .get(w / PAGE_WORDS)
            .and_then(Option::as_ref)
            .map_or(0, |words| words[w % PAGE_WORDS].load(Ordering::Acquire))
    }

    pub fn set(&self, bit: u64) -> bool {
        let mask = 1u64 << (bit % 64);
        self.fetch_or((bit / 64) as usize, mask) & mask == 0
    }

    pub fn get(&self, bit: u64) -> bool {
        self.word((bit / 64) as usize) & (1 << (bit % 64)) != 0
    }

    /// Indices of the words that have any bit set, in order.
    pub fn nonzero_words(&self) -> Vec<usize> {
        let pages = self.read();
        let mut out = Vec::new();
        for (p, page) in pages.iter().enumerate() {
            if let Some(words) = page {
                for (i, word) in words.iter().enumerate() {
                    if word.load(Ordering::Acquire) != 0 {
                        out.push(p * PAGE_WORDS + i);
                    }
                }
            }
        }
        out
    }

    pub fn count_ones(&self) -> u64 {
        let pages = self.read();
        pages
            .iter()
            .flatten()
            .flat_map(|words| words.iter())
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The set bits in `range`, in order, visiting only allocated pages.
    pub fn ones_in(&self, range: std::ops::Range<u64>) -> Vec<u64> {
        let pages = self.read();
        let mut out = Vec::new();
        if range.is_empty() {
            return out;
        }
        let first_word = (range.start / 64) as usize;
        let last_word = ((range.end - 1) / 64) as usize;
        for (p, page) in pages.iter().enumerate() {
            let Some(words) = page else { continue };
            let page_first = p * PAGE_WORDS;
            if page_first + PAGE_WORDS <= first_word || page_first > last_word {
                continue;
            }
            for (i, word) in words.iter().enumerate() {
                let w = page_first + i;
                if w < first_word || w > last_word {
                    continue;
                }
                let mut bits = word.load(Ordering::Acquire);
                while bits != 0 {
                    let bit = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    if range.contains(&bit) {
                        out.push(bit);
                    }
                }
            }
        }
        out
    }

    /// Number of set bits in `range`, visiting only allocated pages.
    pub fn count_in(&self, range: std::ops::Range<u64>) -> u64 {
        if range.is_empty() {
            return 0;
        }
        let pages = self.read();
        let (first_word, last_word) = (range.start / 64, (range.end - 1) / 64);
        let mut count = 0;
        for (p, page) in pages.iter().enumerate() {
            let Some(words) = page else { continue };
            let page_first = (p * PAGE_WORDS) as u64;
            if page_first + PAGE_WORDS as u64 <= first_word || page_first > last_word {
                continue;
            }
            for (i, word) in words.iter().enumerate() {
                let w = page_first + i as u64;
                if w < first_word || w > last_word {
                    continue;
                }
                let lo = if w == first_word { range.start % 64 } else { 0 };
                let hi = if w == last_word {
                    (range.end - 1) % 64
                } else {
                    63
                };
                let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
                count += u64::from((word.load(Ordering::Acquire) & mask).count_ones());
            }
        }
        count
    }

    /// Number of words that memory is reserved for (a multiple of the page size).
    pub fn allocated_words(&self) -> usize {
        self.read().iter().flatten().count() * PAGE_WORDS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_follows_touched_pages_only() {
        let map = Bitmap::new();
        assert!(map.set(5));
        assert!(!map.set(5));
        assert!(map.set(1 << 30));
        assert!(map.get(1 << 30) && map.get(5) && !map.get(6));
        assert_eq!(map.allocated_words(), 2 * PAGE_WORDS);
        assert_eq!(map.count_ones(), 2);
        assert_eq!(map.nonzero_words(), vec![0, (1usize << 30) / 64]);
        assert_eq!(map.word(12345), 0);
        assert_eq!(map.ones_in(0..1 << 31), vec![5, 1 << 30]);
        assert_eq!(map.ones_in(6..1 << 30), Vec::<u64>::new());
        assert_eq!(map.ones_in(5..6), vec![5]);
        assert_eq!(map.count_in(0..1 << 31), 2);
        assert_eq!(map.count_in(5..(1 << 30) + 1), 2);
        assert_eq!(map.count_in(6..1 << 30), 0);
        assert_eq!(map.count_in(5..5), 0);
        for bit in 60..70 {
            map.set(bit);
        }
        assert_eq!(map.count_in(62..68), 6);
        assert_eq!(map.count_in(0..64), 5);
    }
}

//! Reading a snapshot in the bucket: [`RemoteBlocks`] finds a block's chunk through
//! the root's pages, fetches it with a ranged GET and verifies it. Sequential
//! readers (a hydrating volume, `cp`, `dd`) get read-ahead: chunks of the following
//! blocks that lie back to back in the same pack object come in the same request,
//! into a chunk cache bounded by `store.cache_size`. Hydration fetches further ahead
//! ([`SnapshotBlocks::prefetch`]): the chunks of the next blocks to copy, up to a
//! quarter of that cache, as multi-MiB ranges of their packs, several requests at
//! once (`store.download_concurrency`), the next quarter in the background while the
//! blocks before it are copied. A missing or damaged object gives an error
//! (`EIO` to the reader), logged once per object.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use log::error;

use super::client::{Bucket, Job};
use super::format::{PAGE_BLOCKS, Page, RemoteChunk, Root};
use super::{RemoteError, RemoteResult, RemoteStore, lock};
use crate::store::codec::ChunkHash;
use crate::volume::source::SnapshotBlocks;

/// Most bytes (stored) one read-ahead request fetches.
const READ_AHEAD_BYTES: u64 = 4 << 20;

/// Most bytes (stored) one request of a prefetch spans: a quarter of the cache makes
/// several requests per `download_concurrency` workers, so that one slow request
/// holds back little of the next fetch.
const PREFETCH_RANGE_BYTES: u64 = 4 << 20;

/// Largest gap between two chunks of a pack that one prefetch request reads through
/// (bytes fetched and dropped) rather than making two requests.
const PREFETCH_GAP_BYTES: u64 = 256 << 10;

/// Groups chunks into ranges of their packs, one GET each: every range lies in one
/// pack, its chunks in ascending order of offset, at most `gap` bytes between two of
/// them, spanning at most `max` bytes (a larger chunk alone). A chunk listed twice
/// (blocks with the same contents) is fetched once.
pub fn coalesce(mut chunks: Vec<RemoteChunk>, max: u64, gap: u64) -> Vec<Vec<RemoteChunk>> {
    chunks.sort_by(|a, b| (&a.pack, a.offset).cmp(&(&b.pack, b.offset)));
    chunks.dedup_by(|b, a| a.pack == b.pack && a.offset == b.offset);
    let mut ranges: Vec<Vec<RemoteChunk>> = Vec::new();
    for chunk in chunks {
        if let Some(range) = ranges.last_mut() {
            let (first, last) = (&range[0], &range[range.len() - 1]);
            let last_end = last.offset + u64::from(last.stored_len);
            let end = chunk.offset + u64::from(chunk.stored_len);
            if chunk.pack == first.pack
                && chunk.offset >= last_end
                && chunk.offset - last_end <= gap
                && end - first.offset <= max
            {
                range.push(chunk);
                continue;
            }
        }
        ranges.push(vec![chunk]);
    }
    ranges
}

/// Fetches `chunks` into the store's chunk cache, in ranges grouped by [`coalesce`],
/// `download_concurrency` requests at once, each chunk verified; failures are dropped
/// (the reads of those blocks meet them again and report them).
fn fetch(store: &RemoteStore, chunks: &[RemoteChunk]) {
    let ranges = coalesce(chunks.to_vec(), PREFETCH_RANGE_BYTES, PREFETCH_GAP_BYTES);
    let jobs: Vec<Job<'_, RemoteResult<()>>> = ranges
        .iter()
        .map(|range| {
            Box::new(move |_: &Bucket| {
                Ok(store.read_chunks(range, |i, plain| {
                    lock(&store.chunks).insert(range[i].hash, Arc::new(plain.to_vec()));
                }))
            }) as Job<'_, RemoteResult<()>>
        })
        .collect();
    store
        .bucket
        .parallel(store.settings.download_concurrency, jobs);
}

/// Decoded chunks, least recently used first out, bounded by bytes.
pub struct ChunkCache {
    entries: HashMap<ChunkHash, (Arc<Vec<u8>>, u64)>,
    by_age: BTreeMap<u64, ChunkHash>,
    tick: u64,
    bytes: u64,
    limit: u64,
}

impl ChunkCache {
    pub fn new(limit: u64) -> ChunkCache {
        ChunkCache {
            entries: HashMap::new(),
            by_age: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            limit,
        }
    }

    pub fn contains(&self, hash: &ChunkHash) -> bool {
        self.entries.contains_key(hash)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn get(&mut self, hash: &ChunkHash) -> Option<Arc<Vec<u8>>> {
        let (plain, age) = self.entries.get_mut(hash)?;
        self.by_age.remove(age);
        self.tick += 1;
        *age = self.tick;
        self.by_age.insert(self.tick, *hash);
        Some(plain.clone())
    }

    pub fn insert(&mut self, hash: ChunkHash, plain: Arc<Vec<u8>>) {
        if self.entries.contains_key(&hash) {
            return;
        }
        self.tick += 1;
        self.bytes += plain.len() as u64;
        self.by_age.insert(self.tick, hash);
        self.entries.insert(hash, (plain, self.tick));
        while self.bytes > self.limit {
            let Some((_, old)) = self.by_age.pop_first() else {
                break;
            };
            if let Some((plain, _)) = self.entries.remove(&old) {
                self.bytes -= plain.len() as u64;
            }
        }
    }
}

/// The blocks of one snapshot in the bucket.
pub struct RemoteBlocks {
    store: Arc<RemoteStore>,
    pub root_name: String,
    pub root: Arc<Root>,
    block_size: u64,
    /// Objects already reported unreadable (each is logged once).
    reported: Mutex<HashSet<String>>,
    /// A prefetch running in the background.
    ahead: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// One past the last block a prefetch asked for or found cached: the blocks
    /// before it need no second look while they are ahead of the reader.
    frontier: Mutex<u64>,
}

impl RemoteBlocks {
    /// Reads root `root_name` (fails if it is missing or damaged).
    pub fn open(store: Arc<RemoteStore>, root_name: &str) -> Result<RemoteBlocks, RemoteError> {
        let root = store.root(root_name)?.ok_or_else(|| RemoteError::Setup {
            store: store.bucket.shown.clone(),
            reason: format!("snapshot root {root_name} is missing"),
        })?;
        Ok(RemoteBlocks::with_root(store, root_name, Arc::new(root)))
    }

    pub fn with_root(store: Arc<RemoteStore>, root_name: &str, root: Arc<Root>) -> RemoteBlocks {
        RemoteBlocks {
            block_size: u64::from(root.facts.block_size),
            store,
            root_name: root_name.to_string(),
            root,
            reported: Mutex::new(HashSet::new()),
            ahead: Mutex::new(None),
            frontier: Mutex::new(0),
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.root.facts.size_bytes
    }

    fn fail(&self, what: &str, e: RemoteError) -> io::Error {
        if lock(&self.reported).insert(what.to_string()) {
            error!("reading snapshot {}: {e}", self.root_name);
        }
        io::Error::new(io::ErrorKind::InvalidData, e.to_string())
    }

    /// The page holding `block`, if it has any data.
    fn page_of(&self, block: u64) -> io::Result<Option<Arc<Page>>> {
        let Some(name) = self.root.page(block / PAGE_BLOCKS) else {
            return Ok(None);
        };
        self.store
            .page(name)
            .map(Some)
            .map_err(|e| self.fail(name, e))
    }

    /// Where block `block`'s chunk lies; `None` for zeros.
    pub fn chunk_of(&self, block: u64) -> io::Result<Option<RemoteChunk>> {
        Ok(self
            .page_of(block)?
            .and_then(|page| page.get((block % PAGE_BLOCKS) as u16).cloned()))
    }

    /// `block`'s chunk and those of the blocks after it that lie right after it in
    /// the same pack, up to [`READ_AHEAD_BYTES`].
    fn run_from(&self, block: u64, first: RemoteChunk) -> io::Result<Vec<RemoteChunk>> {
        let mut run = vec![first];
        let mut bytes = u64::from(run[0].stored_len);
        let blocks = self.size_bytes().div_ceil(self.block_size);
        let mut next = block + 1;
        while next < blocks && bytes < READ_AHEAD_BYTES {
            let Some(chunk) = self.chunk_of(next)? else {
                break;
            };
            let last = &run[run.len() - 1];
            if chunk.pack != last.pack || chunk.offset != last.offset + u64::from(last.stored_len) {
                break;
            }
            bytes += u64::from(chunk.stored_len);
            run.push(chunk);
            next += 1;
        }
        Ok(run)
    }

    /// The chunks of `blocks` (from the first on) not in the cache, up to `budget`
    /// plain bytes, and one past the last block looked at; `None` for the chunks
    /// when the cached ones before the first missing already reach `budget`
    /// (enough is fetched ahead).
    fn wanted(&self, blocks: &[u64], budget: u64) -> (Option<Vec<RemoteChunk>>, u64) {
        let mut wanted = Vec::new();
        let (mut ahead, mut bytes) = (0u64, 0u64);
        let mut end = blocks.first().copied().unwrap_or(0);
        for &block in blocks {
            let Ok(Some(chunk)) = self.chunk_of(block) else {
                end = block + 1;
                continue;
            };
            let len = u64::from(chunk.plain_len);
            if lock(&self.store.chunks).contains(&chunk.hash) {
                end = block + 1;
                if wanted.is_empty() {
                    ahead += len;
                    if ahead >= budget {
                        return (None, end);
                    }
                }
                continue;
            }
            if bytes + len > budget && !wanted.is_empty() {
                break;
            }
            bytes += len;
            wanted.push(chunk);
            end = block + 1;
        }
        (Some(wanted), end)
    }
}

impl SnapshotBlocks for RemoteBlocks {
    fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        let Some(chunk) = self.chunk_of(block)? else {
            buf.fill(0);
            return Ok(());
        };
        let copy = |buf: &mut [u8], plain: &[u8]| {
            let n = buf.len().min(plain.len());
            buf[..n].copy_from_slice(&plain[..n]);
            buf[n..].fill(0);
        };
        let cached = lock(&self.store.chunks).get(&chunk.hash);
        if let Some(plain) = cached {
            copy(buf, &plain);
            return Ok(());
        }
        let run = self.run_from(block, chunk)?;
        let mut first = None;
        self.store
            .read_chunks(&run, |i, plain| {
                let plain = Arc::new(plain.to_vec());
                if i == 0 {
                    first = Some(plain.clone());
                }
                lock(&self.store.chunks).insert(run[i].hash, plain);
            })
            .map_err(|e| self.fail(&run[0].pack, e))?;
        copy(buf, first.as_deref().map_or(&[][..], |p| &p[..]));
        Ok(())
    }

    /// Fetches the chunks of the next blocks to read, up to a quarter of the cache
    /// (plain bytes), grouped by [`coalesce`], several requests at once: on this
    /// thread when the first block's chunk is not in the cache (once a fetch in the
    /// background has ended), else in the background, unless one runs or the blocks
    /// ahead already asked for fill that quarter. At most half the cache is ahead.
    /// Failures are left for the reads that follow to meet and report.
    ///
    /// Called before every block a hydration copies: the common case (a fetch runs,
    /// or enough is asked for) looks at the first block only.
    fn prefetch(&self, blocks: &[u64]) {
        let Some(&first) = blocks.first() else {
            return;
        };
        let Ok(Some(head)) = self.chunk_of(first) else {
            return;
        };
        let cached = |chunk: &RemoteChunk| lock(&self.store.chunks).contains(&chunk.hash);
        let budget = lock(&self.store.chunks).limit() / 4;
        if !cached(&head) {
            let running = lock(&self.ahead).take();
            if let Some(running) = running {
                let _ = running.join();
            }
            if !cached(&head) {
                let (wanted, end) = self.wanted(blocks, budget);
                *lock(&self.frontier) = end;
                fetch(&self.store, &wanted.unwrap_or_default());
            }
            return;
        }
        let mut ahead = lock(&self.ahead);
        if ahead.as_ref().is_some_and(|running| !running.is_finished()) {
            return;
        }
        // The blocks before the frontier were asked for (or found cached) already.
        let frontier = *lock(&self.frontier);
        let asked = blocks.partition_point(|&b| b < frontier);
        if asked as u64 * self.block_size >= budget {
            return;
        }
        let (wanted, end) = self.wanted(&blocks[asked..], budget);
        *lock(&self.frontier) = end.max(frontier);
        let Some(wanted) = wanted.filter(|w| !w.is_empty()) else {
            return;
        };
        let store = self.store.clone();
        *ahead = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || fetch(&store, &wanted))
            .ok();
    }

    fn data_blocks(&self, blocks: Range<u64>) -> io::Result<Vec<u64>> {
        let mut found = Vec::new();
        for (index, name) in &self.root.pages {
            if index * PAGE_BLOCKS >= blocks.end {
                break;
            }
            if (index + 1) * PAGE_BLOCKS <= blocks.start {
                continue;
            }
            let page = self.store.page(name).map_err(|e| self.fail(name, e))?;
            found.extend(
                page.entries
                    .iter()
                    .map(|(b, _)| index * PAGE_BLOCKS + u64::from(*b))
                    .filter(|b| blocks.contains(b)),
            );
        }
        Ok(found)
    }
}

/// Reads `buf.len()` bytes at `offset` of a snapshot in the bucket (short at its end).
pub fn read_at(blocks: &RemoteBlocks, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let size = blocks.size_bytes();
    let end = offset.saturating_add(buf.len() as u64).min(size);
    if offset >= end {
        return Ok(0);
    }
    let bs = blocks.block_size;
    let mut block_buf = vec![0; bs as usize];
    let mut pos = offset;
    while pos < end {
        let block = pos / bs;
        let within = (pos - block * bs) as usize;
        let take = ((bs - within as u64).min(end - pos)) as usize;
        let at = (pos - offset) as usize;
        if within == 0 && take == bs as usize {
            blocks.read_block(block, &mut buf[at..at + take])?;
        } else {
            blocks.read_block(block, &mut block_buf)?;
            buf[at..at + take].copy_from_slice(&block_buf[within..within + take]);
        }
        pos += take as u64;
    }
    Ok((end - offset) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::format::Page;
    use crate::remote::test_support::store;
    use crate::store::codec::Codec;

    fn chunk(pack: &str, offset: u64, len: u32) -> RemoteChunk {
        RemoteChunk {
            hash: ChunkHash::of(&[pack.as_bytes(), &offset.to_le_bytes()].concat()),
            pack: pack.into(),
            offset,
            stored_len: len,
            plain_len: len,
            codec: Codec::Raw,
        }
    }

    fn spans(ranges: &[Vec<RemoteChunk>]) -> Vec<(String, Vec<u64>)> {
        ranges
            .iter()
            .map(|r| (r[0].pack.clone(), r.iter().map(|c| c.offset).collect()))
            .collect()
    }

    #[test]
    fn coalesce_groups_near_chunks_of_a_pack_up_to_a_size() {
        let chunks = vec![
            chunk("b", 0, 10),
            chunk("a", 30, 10),
            chunk("a", 0, 10),
            chunk("a", 10, 10),
            chunk("a", 10, 10), // the same chunk again: fetched once
            chunk("a", 45, 10), // a gap of 5: read through
            chunk("a", 70, 10), // a gap of 15: a new range
            chunk("a", 80, 10),
            chunk("a", 90, 30), // would span 50 > 40: a new range
            chunk("c", 0, 100), // larger than the most: alone
            chunk("b", 10, 10),
        ];
        let ranges = coalesce(chunks, 40, 10);
        assert_eq!(
            spans(&ranges),
            vec![
                ("a".into(), vec![0, 10, 30]),
                ("a".into(), vec![45]),
                ("a".into(), vec![70, 80]),
                ("a".into(), vec![90]),
                ("b".into(), vec![0, 10]),
                ("c".into(), vec![0]),
            ]
        );
        // "a" 0..40 spans 40 (the most), so 45 starts a new range.
        assert!(coalesce(Vec::new(), 40, 10).is_empty());
    }

    /// A snapshot of `blocks` blocks of 64 KiB in the bucket, every block its own
    /// contents, in packs of `per_pack` blocks; returns its blocks and contents.
    fn snapshot(s: Arc<RemoteStore>, blocks: u64, per_pack: u64) -> (RemoteBlocks, Vec<Vec<u8>>) {
        let plain: Vec<Vec<u8>> = (0..blocks)
            .map(|b| {
                (0..65536u32)
                    .map(|i| (i as u64 * 31 + b * 7) as u8)
                    .collect()
            })
            .collect();
        let mut page = Page::default();
        for (p, first) in (0..blocks).step_by(per_pack as usize).enumerate() {
            let chunks: Vec<_> = (first..(first + per_pack).min(blocks))
                .map(|b| {
                    let data = &plain[b as usize];
                    (
                        ChunkHash::of(data),
                        Codec::Raw,
                        data.len() as u32,
                        data.clone(),
                    )
                })
                .collect();
            let placed = s.put_pack(p as u64, &chunks).unwrap();
            for (i, c) in placed.into_iter().enumerate() {
                page.set((first + i as u64) as u16, Some(c));
            }
        }
        let page = s.put_page(&page).unwrap();
        let root = Root {
            facts: crate::remote::format::RootFacts {
                host: "a".into(),
                snapshot: 1,
                volume: "db".into(),
                label: "s1".into(),
                size_bytes: blocks * 65536,
                block_size: 65536,
                created: crate::namespace::Timestamp(1),
                completed: crate::namespace::Timestamp(2),
                parent: None,
                changed_blocks: blocks,
                stored_bytes: blocks * 65536,
            },
            pages: vec![(0, page)],
        };
        (RemoteBlocks::with_root(s, "root", Arc::new(root)), plain)
    }

    impl RemoteBlocks {
        fn wait_ahead(&self) {
            let running = lock(&self.ahead).take();
            if let Some(running) = running {
                running.join().unwrap();
            }
        }
    }

    #[test]
    fn prefetch_fills_the_cache_in_parallel_within_its_bound() {
        let memory = Arc::new(object_store::memory::InMemory::new());
        let mut settings = crate::remote::test_support::settings();
        settings.cache_size_bytes = 4 << 20; // a quarter: 16 blocks per prefetch
        settings.download_concurrency = 3;
        let bucket = Bucket::with_store(memory.clone(), "p", "memory://test/p".into()).unwrap();
        let s = Arc::new(RemoteStore::open(bucket, "a", None, settings).unwrap());
        let (blocks, plain) = snapshot(s.clone(), 40, 6);
        let all: Vec<u64> = (0..40).collect();
        blocks.prefetch(&all);
        let cached = |b: usize| lock(&s.chunks).contains(&ChunkHash::of(&plain[b]));
        assert!(
            (0..16).all(cached),
            "the first quarter of the cache is fetched"
        );
        assert!(!(16..40).any(cached), "nothing past it");
        // With the head cached, the next quarter comes in the background.
        blocks.prefetch(&all[1..]);
        blocks.wait_ahead();
        assert!((16..32).all(cached));
        assert!(!cached(32));
        // Half the cache ahead: nothing more.
        blocks.prefetch(&all[1..]);
        blocks.wait_ahead();
        assert!(!cached(32));
        // Every block reads back right, through the cache or not.
        let mut buf = vec![0; 65536];
        for b in [0usize, 5, 15, 16, 39] {
            blocks.read_block(b as u64, &mut buf).unwrap();
            assert_eq!(buf, plain[b], "block {b}");
        }
        blocks.prefetch(&all[20..]);
        blocks.wait_ahead();
        assert!((20..40).all(cached));
    }

    #[test]
    fn prefetch_of_a_missing_pack_leaves_the_error_to_the_read() {
        let memory = Arc::new(object_store::memory::InMemory::new());
        let s = Arc::new(store(&memory, "a", None).unwrap());
        let (blocks, plain) = snapshot(s.clone(), 8, 4);
        let pack = blocks.chunk_of(5).unwrap().unwrap().pack;
        s.bucket.delete(&pack).unwrap();
        let all: Vec<u64> = (0..8).collect();
        blocks.prefetch(&all);
        let mut buf = vec![0; 65536];
        blocks.read_block(0, &mut buf).unwrap();
        assert_eq!(buf, plain[0]);
        let err = blocks.read_block(5, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}

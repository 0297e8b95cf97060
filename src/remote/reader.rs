//! Reading a snapshot in the bucket: [`RemoteBlocks`] finds a block's chunk through
//! the root's pages, fetches it with a ranged GET and verifies it. Sequential
//! readers (a hydrating volume, `cp`, `dd`) get read-ahead: chunks of the following
//! blocks that lie back to back in the same pack object come in the same request,
//! into a chunk cache bounded by `store.cache_size`. A missing or damaged object
//! gives an error (`EIO` to the reader), logged once per object.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use log::error;

use super::format::{PAGE_BLOCKS, Page, RemoteChunk, Root};
use super::{RemoteError, RemoteStore, lock};
use crate::store::codec::ChunkHash;
use crate::volume::source::SnapshotBlocks;

/// Most bytes (stored) one read-ahead request fetches.
const READ_AHEAD_BYTES: u64 = 4 << 20;

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
        if let Some(plain) = lock(&self.store.chunks).get(&chunk.hash) {
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

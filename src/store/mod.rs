//! Content-addressed block store: chunks named by the BLAKE3 hash of their contents,
//! zstd-compressed, appended to pack files, indexed in the metadata database.
//!
//! Invariants:
//! - a chunk's bytes are durable (pack fsynced) before any committed row points at them;
//! - an index row's reference count equals the number of manifest entries naming it;
//! - space is freed only after the transaction that removed the row has committed, and
//!   never while a capture that might have looked the row up is still running: such a
//!   capture may bring the row back at its commit (see [`ChunkStore::begin_capture`]).

pub mod cache;
pub mod codec;
pub mod index;
pub mod pack;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{error, info, warn};
use redb::ReadableDatabase;

use crate::meta::{self, CHUNKS, Meta, MetaError, PACKS};
use cache::BlockCache;
use codec::{ChunkHash, CodecError};
pub use index::ChunkLocation;
use pack::{PACK_TARGET_BYTES, PackFile, PackWriter};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk store I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

pub type StoreResult<T> = Result<T, StoreError>;

thread_local! {
    /// Pack bytes read by this thread, reused so reads neither allocate nor zero.
    static PACK_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Space whose index rows are gone, waiting for running captures to finish.
struct Reclaim {
    active_captures: usize,
    deferred: Vec<(ChunkHash, ChunkLocation)>,
}

pub struct ChunkStore {
    dir: PathBuf,
    packs: Mutex<HashMap<u32, Arc<PackFile>>>,
    /// Packs below the target size that no capture is appending to: (id, committed length).
    idle: Mutex<Vec<(u32, u64)>>,
    reclaim: Mutex<Reclaim>,
    cache: BlockCache,
    pub compression_level: i32,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ChunkStore {
    /// Opens `dir`, cutting every pack back to its committed length: bytes beyond it
    /// were written by a capture that never committed.
    pub fn open(
        dir: &Path,
        meta: &Meta,
        compression_level: i32,
        cache_bytes: u64,
    ) -> StoreResult<ChunkStore> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let committed = meta.load_packs()?;
        let mut packs = HashMap::new();
        let mut idle = Vec::new();
        for (&id, &len) in &committed {
            let pack = PackFile::open(dir, id).map_err(io_at(&pack::pack_path(dir, id)))?;
            let on_disk = pack.file_len().map_err(io_at(&pack::pack_path(dir, id)))?;
            if on_disk > len {
                info!("pack {id}: dropping {} uncommitted bytes", on_disk - len);
                pack.truncate(len)
                    .map_err(io_at(&pack::pack_path(dir, id)))?;
            }
            if len < PACK_TARGET_BYTES {
                idle.push((id, len));
            }
            packs.insert(id, Arc::new(pack));
        }
        for entry in fs::read_dir(dir).map_err(io_at(dir))? {
            let entry = entry.map_err(io_at(dir))?;
            let name = entry.file_name();
            if let Some(id) = name.to_str().and_then(pack::pack_id_of)
                && !committed.contains_key(&id)
            {
                info!("removing pack {id}: it was never committed");
                fs::remove_file(entry.path()).map_err(io_at(&entry.path()))?;
            }
        }
        Ok(ChunkStore {
            dir: dir.to_path_buf(),
            packs: Mutex::new(packs),
            idle: Mutex::new(idle),
            reclaim: Mutex::new(Reclaim {
                active_captures: 0,
                deferred: Vec::new(),
            }),
            cache: BlockCache::new(cache_bytes),
            compression_level,
        })
    }

    fn pack(&self, id: u32) -> StoreResult<Arc<PackFile>> {
        if let Some(pack) = lock(&self.packs).get(&id) {
            return Ok(pack.clone());
        }
        let path = pack::pack_path(&self.dir, id);
        if !path.exists() {
            return Err(StoreError::Io {
                path,
                source: io::Error::new(io::ErrorKind::NotFound, "pack file is missing"),
            });
        }
        let pack = Arc::new(PackFile::open(&self.dir, id).map_err(io_at(&path))?);
        lock(&self.packs).insert(id, pack.clone());
        Ok(pack)
    }

    /// Reads, verifies and decompresses `chunks`, handing each one's plain bytes to
    /// `sink(i, bytes)` in order. `keep(i)` says whether chunk `i` is worth caching (a
    /// block read whole by a sequential reader is not). Chunks missing from the cache
    /// that lie back to back in a pack (as a snapshot written in one go does) are read
    /// with one `pread`, into a buffer each thread reuses.
    pub fn read_chunks(
        &self,
        chunks: &[(ChunkHash, ChunkLocation)],
        keep: impl Fn(usize) -> bool,
        mut sink: impl FnMut(usize, &[u8]),
    ) -> StoreResult<()> {
        let mut i = 0;
        while i < chunks.len() {
            if let Some(hit) = self.cache.get(&chunks[i].0) {
                sink(i, &hit);
                i += 1;
                continue;
            }
            // A run of misses, each starting where the previous one's pages end.
            let mut run_end = i + 1;
            while run_end < chunks.len()
                && chunks[run_end].1.pack == chunks[i].1.pack
                && chunks[run_end].1.offset
                    == pack::align_up(
                        chunks[run_end - 1].1.offset + u64::from(chunks[run_end - 1].1.stored_len),
                    )
                && self.cache.get(&chunks[run_end].0).is_none()
            {
                run_end += 1;
            }
            let first = chunks[i].1;
            let last = chunks[run_end - 1].1;
            let len = (last.offset + u64::from(last.stored_len) - first.offset) as usize;
            let pack = self.pack(first.pack)?;
            PACK_BUF.with_borrow_mut(|bytes| -> StoreResult<()> {
                if bytes.len() < len {
                    bytes.resize(len, 0);
                }
                pack.read_into(&mut bytes[..len], first.offset)
                    .map_err(io_at(&pack::pack_path(&self.dir, first.pack)))?;
                for (n, (hash, loc)) in chunks.iter().enumerate().take(run_end).skip(i) {
                    let at = (loc.offset - first.offset) as usize;
                    let payload = &bytes[at..at + loc.stored_len as usize];
                    let plain = codec::decode(payload, loc.codec, loc.plain_len as usize, *hash)
                        .inspect_err(|e| error!("{e} (pack {} offset {})", loc.pack, loc.offset))?;
                    sink(n, &plain);
                    if keep(n) {
                        self.cache.insert(*hash, Arc::new(plain.into_owned()));
                    }
                }
                Ok(())
            })?;
            i = run_end;
        }
        Ok(())
    }

    /// Registers a running capture: until it ends, freed space is only queued, so
    /// that chunks it found in the index stay readable until its commit.
    pub fn begin_capture(&self) {
        lock(&self.reclaim).active_captures += 1;
    }

    /// Ends a capture; the last one out frees the queued space whose rows are still gone.
    pub fn end_capture(&self, meta: &Meta) {
        let mut reclaim = lock(&self.reclaim);
        reclaim.active_captures -= 1;
        if reclaim.active_captures == 0 && !reclaim.deferred.is_empty() {
            let deferred = std::mem::take(&mut reclaim.deferred);
            // Still under the lock: no capture can start and look these up meanwhile.
            if let Err(e) = self.free_unless_revived(meta, &deferred) {
                warn!("freeing chunk space: {e}");
            }
        }
    }

    /// Frees the space of chunks whose index rows a committed transaction removed.
    pub fn release(&self, meta: &Meta, freed: Vec<(ChunkHash, ChunkLocation)>) {
        if freed.is_empty() {
            return;
        }
        let mut reclaim = lock(&self.reclaim);
        if reclaim.active_captures > 0 {
            reclaim.deferred.extend(freed);
        } else if let Err(e) = self.free_unless_revived(meta, &freed) {
            warn!("freeing chunk space: {e}");
        }
    }

    fn free_unless_revived(
        &self,
        meta: &Meta,
        freed: &[(ChunkHash, ChunkLocation)],
    ) -> StoreResult<()> {
        let txn = meta.db.begin_read().map_err(MetaError::from)?;
        let table = txn.open_table(CHUNKS).map_err(MetaError::from)?;
        let mut extents = Vec::with_capacity(freed.len());
        for (hash, loc) in freed {
            if index::lookup(&table, hash)?.is_some_and(|(now, _)| now == *loc) {
                continue;
            }
            let end = pack::align_up(loc.offset + u64::from(loc.stored_len));
            extents.push((loc.pack, loc.offset, end));
        }
        self.punch_extents(extents)
    }

    /// Punches `(pack, start, end)` ranges, merging neighbours so that freeing a
    /// whole snapshot written in one go costs a handful of calls, not one per chunk.
    fn punch_extents(&self, mut extents: Vec<(u32, u64, u64)>) -> StoreResult<()> {
        extents.sort_unstable();
        let mut merged: Vec<(u32, u64, u64)> = Vec::with_capacity(extents.len());
        for (pack, start, end) in extents {
            match merged.last_mut() {
                Some(last) if last.0 == pack && start <= last.2 => last.2 = last.2.max(end),
                _ => merged.push((pack, start, end)),
            }
        }
        for (pack_id, start, end) in merged {
            let pack = self.pack(pack_id)?;
            pack.punch(start, end - start)
                .map_err(io_at(&pack::pack_path(&self.dir, pack_id)))?;
        }
        Ok(())
    }

    /// Hands out a pack for one capture to append to.
    pub fn checkout_writer(&self, meta: &Meta) -> StoreResult<PackWriter> {
        if let Some((id, len)) = lock(&self.idle).pop() {
            return Ok(PackWriter::new(self.pack(id)?, len));
        }
        let txn = meta.begin_write()?;
        let id = meta::next_pack_id(&txn)?;
        txn.open_table(PACKS)
            .map_err(MetaError::from)?
            .insert(id, 0)
            .map_err(MetaError::from)?;
        let path = pack::pack_path(&self.dir, id);
        let pack = Arc::new(PackFile::open(&self.dir, id).map_err(io_at(&path))?);
        txn.commit().map_err(MetaError::from)?;
        lock(&self.packs).insert(id, pack.clone());
        Ok(PackWriter::new(pack, 0))
    }

    /// Returns a writer's pack for later captures to append to.
    pub fn return_writer(&self, writer: PackWriter) {
        let len = writer.end();
        if len < PACK_TARGET_BYTES {
            lock(&self.idle).push((writer.pack.id, len));
        }
    }

    /// Punches every byte of every pack that no index row references: space leaked by
    /// a crash between a commit and the freeing of what it released.
    pub fn reclaim_unreferenced(&self, meta: &Meta) -> StoreResult<u64> {
        let txn = meta.begin_read()?;
        let table = txn.open_table(CHUNKS).map_err(MetaError::from)?;
        let mut live: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
        for row in redb::ReadableTable::range::<&[u8; 32]>(&table, ..).map_err(MetaError::from)? {
            let (_, row) = row.map_err(MetaError::from)?;
            let (pack, offset, stored_len, ..) = row.value();
            live.entry(pack)
                .or_default()
                .push((offset, pack::align_up(offset + u64::from(stored_len))));
        }
        let mut punched = 0;
        let mut gaps = Vec::new();
        for (&id, &len) in &meta.load_packs()? {
            let mut extents = live.remove(&id).unwrap_or_default();
            extents.sort_unstable();
            let mut cursor = 0;
            for (start, end) in extents.into_iter().chain([(len, len)]) {
                if start > cursor {
                    gaps.push((id, cursor, start));
                    punched += start - cursor;
                }
                cursor = cursor.max(end);
            }
        }
        self.punch_extents(gaps)?;
        Ok(punched)
    }
}

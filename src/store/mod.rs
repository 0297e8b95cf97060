//! Content-addressed block store: chunks named by the BLAKE3 hash of their contents,
//! zstd-compressed, appended to pack files, indexed in the metadata database.
//!
//! Invariants:
//! - a chunk's bytes are durable (pack fsynced) before any committed row points at them;
//! - an index row's reference count equals the number of manifest entries naming it;
//! - space is freed only after the transaction that removed the row has committed, and
//!   never while a capture that might have looked the row up is still running: such a
//!   capture may bring the row back at its commit (see [`ChunkStore::begin_capture`]);
//! - a chunk that failed verification is never reused by dedup: it is remembered as
//!   bad, and a capture that needs its contents stores a fresh copy, which then
//!   replaces the damaged one in the index (healing every snapshot that names it);
//! - nothing is recreated or deleted on a guess: a missing or damaged pack is reported
//!   and its chunks read as errors; files nobody knows go to `lost+found/`.

pub mod cache;
pub mod codec;
pub mod index;
pub mod pack;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, error, info, warn};

use crate::layout::{Layout, parse_pack_file};
use crate::namespace::tables::CHUNKS;
use crate::namespace::{Namespace, NamespaceError};
use crate::storage::Storage;
use crate::storage::direct::AlignedBuf;
use cache::BlockCache;
use codec::{ChunkHash, CodecError};
pub use index::ChunkLocation;
use pack::{PACK_TARGET_BYTES, PackFile, PackWriter};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk store I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("pack {pack} is damaged: {reason}")]
    DamagedPack { pack: u32, reason: String },
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
}

pub type StoreResult<T> = Result<T, StoreError>;

thread_local! {
    /// Pack bytes read by this thread, reused so reads neither allocate nor zero;
    /// page-aligned, so that long reads may go direct.
    static PACK_BUF: std::cell::RefCell<AlignedBuf> = const { std::cell::RefCell::new(AlignedBuf::new()) };
}

fn io_at(path: &std::path::Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
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

pub struct ChunkStore<S: Storage> {
    storage: S,
    layout: Layout,
    packs: Mutex<HashMap<u32, Arc<PackFile<S>>>>,
    /// Packs that cannot serve reads as a whole (missing file, bad header), and why.
    damaged_packs: Mutex<BTreeMap<u32, String>>,
    /// Packs below the target size that no capture is appending to: (id, committed length).
    idle: Mutex<Vec<(u32, u64)>>,
    reclaim: Mutex<Reclaim>,
    /// Chunks that failed to read or verify since the daemon started.
    bad_chunks: Mutex<HashSet<ChunkHash>>,
    cache: BlockCache,
    pub compression_level: i32,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<S: Storage> ChunkStore<S> {
    /// Opens the packs the database knows. Bytes past a pack's committed length were
    /// written by a capture that never committed and are cut off; a missing, damaged
    /// or truncated pack is reported (and served as damaged), never recreated; files
    /// in `chunks/` that no row accounts for are moved to `lost+found/`.
    pub fn open(
        storage: &S,
        layout: &Layout,
        ns: &Namespace,
        compression_level: i32,
        cache_bytes: u64,
    ) -> StoreResult<ChunkStore<S>> {
        let dir = layout.chunks_dir();
        storage.create_dir_all(&dir).map_err(io_at(&dir))?;
        let committed = ns.packs()?;
        let store = ChunkStore {
            storage: storage.clone(),
            layout: layout.clone(),
            packs: Mutex::new(HashMap::new()),
            damaged_packs: Mutex::new(BTreeMap::new()),
            idle: Mutex::new(Vec::new()),
            reclaim: Mutex::new(Reclaim {
                active_captures: 0,
                deferred: Vec::new(),
            }),
            bad_chunks: Mutex::new(HashSet::new()),
            cache: BlockCache::new(cache_bytes),
            compression_level,
        };
        for &(id, len) in &committed {
            store.open_pack(id, len)?;
        }
        let known: HashSet<u32> = committed.iter().map(|&(id, _)| id).collect();
        for name in storage.list_dir(&dir).map_err(io_at(&dir))? {
            if parse_pack_file(&name).is_some_and(|id| known.contains(&id)) {
                continue;
            }
            let path = dir.join(&name);
            layout
                .move_to_lost_found(storage, &path, "no pack of this name was ever committed")
                .map_err(io_at(&path))?;
        }
        Ok(store)
    }

    fn open_pack(&self, id: u32, committed: u64) -> StoreResult<()> {
        let path = self.layout.pack(id);
        let on_disk = self.storage.file_len(&path).map_err(io_at(&path))?;
        let Some(on_disk) = on_disk else {
            if committed == 0 {
                // Its row committed, its file never made: nothing was ever in it.
                debug!("pack {id} was never written; not using it");
            } else {
                self.mark_damaged(id, "the pack file is missing".into());
            }
            return Ok(());
        };
        let pack = PackFile::open(&self.storage, path.clone(), id).map_err(io_at(&path))?;
        if let Err(reason) = pack.verify_header().map_err(io_at(&path))? {
            if committed == 0 {
                // Created but never committed to: its header may not have reached the disk.
                let pack =
                    PackFile::create(&self.storage, path.clone(), id).map_err(io_at(&path))?;
                lock(&self.packs).insert(id, Arc::new(pack));
                lock(&self.idle).push((id, 0));
            } else {
                self.mark_damaged(id, reason);
            }
            return Ok(());
        }
        let committed_end = committed.max(pack::HEADER_BYTES);
        if on_disk > committed_end {
            info!(
                "pack {id}: dropping {} bytes no commit references",
                on_disk - committed_end
            );
            pack.truncate(committed_end).map_err(io_at(&path))?;
        } else if on_disk < committed {
            let reason = format!(
                "it is {on_disk} bytes but {committed} were committed: chunks past its end are lost"
            );
            warn!("pack {id}: {reason} (run `ebsfs check`)");
            lock(&self.damaged_packs).insert(id, reason);
            lock(&self.packs).insert(id, Arc::new(pack));
            return Ok(());
        }
        if committed < PACK_TARGET_BYTES {
            lock(&self.idle).push((id, committed));
        }
        lock(&self.packs).insert(id, Arc::new(pack));
        Ok(())
    }

    fn mark_damaged(&self, id: u32, reason: String) {
        error!("pack {id} is damaged: {reason}; its chunks cannot be read (run `ebsfs check`)");
        lock(&self.damaged_packs).insert(id, reason);
    }

    /// Packs found damaged at start-up, and why.
    pub fn damaged_packs(&self) -> BTreeMap<u32, String> {
        lock(&self.damaged_packs).clone()
    }

    fn pack(&self, id: u32) -> StoreResult<Arc<PackFile<S>>> {
        if let Some(pack) = lock(&self.packs).get(&id) {
            return Ok(pack.clone());
        }
        let reason = lock(&self.damaged_packs)
            .get(&id)
            .cloned()
            .unwrap_or_else(|| "no such pack".into());
        Err(StoreError::DamagedPack { pack: id, reason })
    }

    /// Whether chunk `hash` failed to read or verify since the daemon started.
    pub fn is_bad(&self, hash: &ChunkHash) -> bool {
        lock(&self.bad_chunks).contains(hash)
    }

    fn note_bad(&self, chunks: &[(ChunkHash, ChunkLocation)], why: &StoreError) {
        let mut bad = lock(&self.bad_chunks);
        for (hash, loc) in chunks {
            if bad.insert(*hash) {
                error!(
                    "chunk {hash} (pack {} offset {}) is unreadable: {why}",
                    loc.pack, loc.offset
                );
            }
        }
    }

    /// Whether the stored copy of `hash` at `loc` reads back and verifies (a cached
    /// copy was verified when it was cached). Used before dedup reuses a chunk.
    pub fn verify(&self, hash: &ChunkHash, loc: ChunkLocation) -> bool {
        if self.is_bad(hash) {
            return false;
        }
        self.cache.get(hash).is_some()
            || self
                .read_chunks(&[(*hash, loc)], |_| false, |_, _| {})
                .is_ok()
    }

    /// Reads, verifies and decompresses `chunks`, handing each one's plain bytes to
    /// `sink(i, bytes)` in order. `keep(i)` says whether chunk `i` is worth caching (a
    /// block read whole by a sequential reader is not). Chunks missing from the cache
    /// that lie back to back in a pack (as a snapshot written in one go does) are read
    /// with one read, into a buffer each thread reuses.
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
            let run = &chunks[i..run_end];
            self.read_run(run, |n, plain| {
                sink(i + n, plain);
                keep(i + n)
            })
            .inspect_err(|e| self.note_bad(run, e))?;
            i = run_end;
        }
        Ok(())
    }

    /// Reads one run of chunks lying back to back in a pack; `sink(n, plain)` returns
    /// whether to cache chunk `n`.
    fn read_run(
        &self,
        run: &[(ChunkHash, ChunkLocation)],
        mut sink: impl FnMut(usize, &[u8]) -> bool,
    ) -> StoreResult<()> {
        self.with_run(run, |n, hash, loc, payload| {
            let plain = codec::decode(payload, loc.codec, loc.plain_len as usize, *hash)?;
            if sink(n, &plain) {
                self.cache.insert(*hash, Arc::new(plain.into_owned()));
            }
            Ok(())
        })
    }

    /// Hands `visit(n, hash, location, payload)` each stored payload of a run of
    /// chunks lying back to back in a pack, read with one read.
    fn with_run(
        &self,
        run: &[(ChunkHash, ChunkLocation)],
        mut visit: impl FnMut(usize, &ChunkHash, &ChunkLocation, &[u8]) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let first = run[0].1;
        let last = run[run.len() - 1].1;
        let len = (last.offset + u64::from(last.stored_len) - first.offset) as usize;
        let pack = self.pack(first.pack)?;
        PACK_BUF.with_borrow_mut(|buf| -> StoreResult<()> {
            // Payloads start on page boundaries and are padded to the next: read whole pages.
            let bytes = buf.slice_mut(pack::align_up(len as u64) as usize);
            pack.read_at_least(bytes, first.offset, len)
                .map_err(io_at(&pack.path))?;
            for (n, (hash, loc)) in run.iter().enumerate() {
                let at = (loc.offset - first.offset) as usize;
                visit(n, hash, loc, &bytes[at..at + loc.stored_len as usize])?;
            }
            Ok(())
        })
    }

    /// Reads chunks as stored (compressed or raw), each verified against its hash
    /// first, for copying elsewhere: `sink(i, payload)`.
    pub fn read_payloads(
        &self,
        chunks: &[(ChunkHash, ChunkLocation)],
        mut sink: impl FnMut(usize, &[u8]),
    ) -> StoreResult<()> {
        let mut i = 0;
        while i < chunks.len() {
            let mut run_end = i + 1;
            while run_end < chunks.len()
                && chunks[run_end].1.pack == chunks[i].1.pack
                && chunks[run_end].1.offset
                    == pack::align_up(
                        chunks[run_end - 1].1.offset + u64::from(chunks[run_end - 1].1.stored_len),
                    )
            {
                run_end += 1;
            }
            let run = &chunks[i..run_end];
            self.with_run(run, |n, hash, loc, payload| {
                codec::decode(payload, loc.codec, loc.plain_len as usize, *hash)?;
                sink(i + n, payload);
                Ok(())
            })
            .inspect_err(|e| self.note_bad(run, e))?;
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
    pub fn end_capture(&self, ns: &Namespace) {
        let mut reclaim = lock(&self.reclaim);
        reclaim.active_captures -= 1;
        if reclaim.active_captures == 0 && !reclaim.deferred.is_empty() {
            let deferred = std::mem::take(&mut reclaim.deferred);
            // Still under the lock: no capture can start and look these up meanwhile.
            if let Err(e) = self.free_unless_revived(ns, &deferred) {
                warn!("freeing chunk space: {e}");
            }
        }
    }

    /// Frees the space of chunks whose index rows a committed transaction removed.
    pub fn release(&self, ns: &Namespace, freed: Vec<(ChunkHash, ChunkLocation)>) {
        if freed.is_empty() {
            return;
        }
        let mut reclaim = lock(&self.reclaim);
        if reclaim.active_captures > 0 {
            reclaim.deferred.extend(freed);
        } else if let Err(e) = self.free_unless_revived(ns, &freed) {
            warn!("freeing chunk space: {e}");
        }
    }

    fn free_unless_revived(
        &self,
        ns: &Namespace,
        freed: &[(ChunkHash, ChunkLocation)],
    ) -> StoreResult<()> {
        let txn = ns.read()?;
        let table = txn.open_table(CHUNKS).map_err(NamespaceError::from)?;
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
            let Ok(pack) = self.pack(pack_id) else {
                continue;
            };
            pack.punch(start, end - start).map_err(io_at(&pack.path))?;
        }
        Ok(())
    }

    /// Hands out a pack for one capture to append to. A new pack's row is committed
    /// before its file is created, so a pack file always has a row.
    pub fn checkout_writer(&self, ns: &Namespace) -> StoreResult<PackWriter<S>> {
        let idle = lock(&self.idle).pop();
        if let Some((id, len)) = idle {
            return Ok(PackWriter::new(self.pack(id)?, len));
        }
        let id = ns.change_data(|data| -> Result<u32, NamespaceError> {
            let id = data.next_pack_id()?;
            data.set_pack_len(id, 0)?;
            Ok(id)
        })?;
        let path = self.layout.pack(id);
        let pack =
            Arc::new(PackFile::create(&self.storage, path.clone(), id).map_err(io_at(&path))?);
        lock(&self.packs).insert(id, pack.clone());
        Ok(PackWriter::new(pack, 0))
    }

    /// Returns a writer's pack for later captures to append to.
    pub fn return_writer(&self, writer: PackWriter<S>) {
        let len = writer.end();
        if len < PACK_TARGET_BYTES {
            lock(&self.idle).push((writer.pack.id, len));
        }
    }

    /// Punches every byte of every pack that no index row references (the header
    /// excepted): space leaked by a crash between a commit and the freeing of what it
    /// released. The database proves these bytes garbage. Returns the bytes punched.
    pub fn reclaim_unreferenced(&self, ns: &Namespace) -> StoreResult<u64> {
        let txn = ns.read()?;
        let table = txn.open_table(CHUNKS).map_err(NamespaceError::from)?;
        let mut live = index::live_extents(&table)?;
        let damaged = self.damaged_packs();
        let mut punched = 0;
        let mut gaps = Vec::new();
        for (id, len) in ns.packs()? {
            if damaged.contains_key(&id) {
                continue;
            }
            let extents = live.remove(&id).unwrap_or_default();
            for (start, end) in pack::unreferenced_ranges(&extents, len) {
                gaps.push((id, start, end));
                punched += end - start;
            }
        }
        self.punch_extents(gaps)?;
        Ok(punched)
    }
}

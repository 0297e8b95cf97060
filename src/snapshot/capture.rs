//! The capture: turns a [`Freeze`] into a completed snapshot.
//!
//! Workers take the frozen blocks in order, hash them, skip those identical to the
//! base snapshot, and store each new chunk once (compressed, appended to a pack this
//! capture owns). Nothing becomes visible until [`commit`]: the pack is fsynced, then
//! one transaction adds the manifest entries, the chunk references and the
//! `completed` status. A capture cut off before that leaves no trace but bytes past
//! the pack's committed length, which the store cuts off.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use log::warn;

use crate::meta::{CHUNKS, MANIFEST, Meta, MetaError};
use crate::store::codec::{ChunkHash, Codec, Compressor};
use crate::store::pack::{self, PackWriter};
use crate::store::{ChunkLocation, ChunkStore, index};
use crate::volume::Volume;
use crate::volume::freeze::Freeze;

use super::SnapshotError;
use super::manifest::{self, BlockContent};

/// Live state of a running capture, shared with readers of `progress` and `rmdir`.
#[derive(Default)]
pub struct CaptureProgress {
    pub total_blocks: AtomicU64,
    pub done_blocks: AtomicU64,
    pub cancelled: AtomicBool,
    finished: Mutex<bool>,
    finished_signal: Condvar,
}

impl CaptureProgress {
    pub fn percent(&self) -> u64 {
        let total = self.total_blocks.load(Ordering::Relaxed);
        let done = self.done_blocks.load(Ordering::Relaxed);
        (done * 100).checked_div(total).map_or(0, |p| p.min(99))
    }

    pub fn finish(&self) {
        *self.finished.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.finished_signal.notify_all();
    }

    pub fn wait(&self) {
        let mut finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        while !*finished {
            finished = self
                .finished_signal
                .wait(finished)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Everything a capture needs, fixed at the freeze.
pub struct CaptureJob {
    pub snapshot: u64,
    pub lineage: u64,
    /// The snapshot this one is incremental against.
    pub base: Option<u64>,
    pub volume: Arc<Volume>,
    pub freeze: Arc<Freeze>,
    pub progress: Arc<CaptureProgress>,
}

/// What the workers found, ready to commit.
#[derive(Default)]
pub struct Captured {
    pub entries: Vec<(u64, BlockContent)>,
    /// Chunks this capture wrote.
    pub new_chunks: HashMap<ChunkHash, ChunkLocation>,
    /// Chunks found already stored when looked up.
    pub existing: HashMap<ChunkHash, ChunkLocation>,
    /// Copies written twice by racing workers: never referenced, freed after commit.
    pub duplicates: Vec<(ChunkHash, ChunkLocation)>,
    pub stored_bytes: u64,
}

/// Reads, hashes and stores every block of the freeze on `threads` workers.
pub fn run(
    job: &CaptureJob,
    meta: &Meta,
    store: &ChunkStore,
    writer: &PackWriter,
    threads: usize,
) -> Result<Captured, SnapshotError> {
    let units = job.freeze.unit_count();
    job.progress
        .total_blocks
        .store(job.freeze.block_count(), Ordering::Relaxed);
    let shared = Workers {
        job,
        meta,
        store,
        writer,
        cursor: AtomicUsize::new(0),
        units,
        threads: threads.max(1),
        captured: Mutex::new(Captured::default()),
    };
    let first_error: Mutex<Option<SnapshotError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..shared.threads {
            scope.spawn(|| {
                if let Err(e) = worker(&shared) {
                    job.progress.cancelled.store(true, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if job.progress.cancelled.load(Ordering::Relaxed) {
        return Err(SnapshotError::Cancelled);
    }
    if let Some(failure) = job.freeze.failure() {
        return Err(SnapshotError::CaptureFailed(failure));
    }
    Ok(shared
        .captured
        .into_inner()
        .unwrap_or_else(|p| p.into_inner()))
}

/// What the capture workers share.
struct Workers<'a> {
    job: &'a CaptureJob,
    meta: &'a Meta,
    store: &'a ChunkStore,
    writer: &'a PackWriter,
    /// Next unit of work to take.
    cursor: AtomicUsize,
    units: usize,
    threads: usize,
    captured: Mutex<Captured>,
}

fn worker(workers: &Workers<'_>) -> Result<(), SnapshotError> {
    let Workers {
        job,
        meta,
        store,
        writer,
        ref cursor,
        units,
        threads,
        captured: ref shared,
    } = *workers;
    let txn = meta.begin_read()?;
    let manifest_table = txn.open_table(MANIFEST).map_err(MetaError::from)?;
    let chunk_table = txn.open_table(CHUNKS).map_err(MetaError::from)?;
    let live = job.volume.data_file();
    let mut compressor = Compressor::new(store.compression_level)
        .map_err(|e| SnapshotError::CaptureFailed(format!("zstd: {e}")))?;
    let mut data = Vec::new();
    let mut run = Run::default();
    loop {
        let unit = cursor.fetch_add(1, Ordering::Relaxed);
        if unit >= units || job.progress.cancelled.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Units are taken in order by all workers: read this one and the one this
        // worker will likely take next ahead of need.
        job.freeze.prefetch_unit(live, unit);
        job.freeze.prefetch_unit(live, unit + threads);
        for block in job.freeze.unit_blocks(unit) {
            job.freeze
                .take_into(live, block, &mut data)
                .map_err(|e| SnapshotError::CaptureFailed(format!("reading block {block}: {e}")))?;
            let content = if data.iter().all(|&b| b == 0) {
                BlockContent::Zero
            } else {
                BlockContent::Chunk(ChunkHash::of(&data))
            };
            let unchanged = match job.base {
                Some(base) => {
                    manifest::resolve(&manifest_table, job.lineage, block, base)? == content
                }
                None => content == BlockContent::Zero,
            };
            if !unchanged {
                if let BlockContent::Chunk(hash) = content {
                    store_chunk(&mut compressor, &mut run, &chunk_table, shared, hash, &data)?;
                }
                shared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entries
                    .push((block, content));
            }
            job.progress.done_blocks.fetch_add(1, Ordering::Relaxed);
        }
        run.flush(writer, shared)?;
    }
}

/// Chunks a worker encoded but has not written yet: one unit's worth, appended as a
/// single contiguous run so that neighbouring blocks stay neighbours in the pack (a
/// sequential read of the snapshot then reads the pack sequentially).
#[derive(Default)]
struct Run {
    /// Payloads, each padded to the pack alignment.
    bytes: Vec<u8>,
    /// (hash, codec, offset within `bytes`, stored length, plain length)
    chunks: Vec<(ChunkHash, Codec, u64, u32, u32)>,
}

impl Run {
    fn contains(&self, hash: &ChunkHash) -> bool {
        self.chunks.iter().any(|c| c.0 == *hash)
    }

    fn push(&mut self, hash: ChunkHash, codec: Codec, payload: &[u8], plain_len: usize) {
        let at = self.bytes.len() as u64;
        self.bytes.extend_from_slice(payload);
        self.bytes
            .resize(pack::align_up(self.bytes.len() as u64) as usize, 0);
        self.chunks
            .push((hash, codec, at, payload.len() as u32, plain_len as u32));
    }

    /// Appends the run to the pack and publishes where each chunk went.
    fn flush(
        &mut self,
        writer: &PackWriter,
        shared: &Mutex<Captured>,
    ) -> Result<(), SnapshotError> {
        if self.chunks.is_empty() {
            return Ok(());
        }
        let base = writer.append(&self.bytes).map_err(|e| {
            SnapshotError::CaptureFailed(format!("writing to pack {}: {e}", writer.pack.id))
        })?;
        let mut captured = shared.lock().unwrap_or_else(|p| p.into_inner());
        for (hash, codec, at, stored_len, plain_len) in self.chunks.drain(..) {
            let loc = ChunkLocation {
                pack: writer.pack.id,
                offset: base + at,
                stored_len,
                plain_len,
                codec,
            };
            match captured.new_chunks.entry(hash) {
                std::collections::hash_map::Entry::Occupied(_) => {
                    captured.duplicates.push((hash, loc));
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(loc);
                    captured.stored_bytes += u64::from(stored_len);
                }
            }
        }
        self.bytes.clear();
        Ok(())
    }
}

/// Adds a block's chunk to `run` unless it is stored already (by this capture or
/// before it), in which case its location is remembered.
fn store_chunk(
    compressor: &mut Compressor,
    run: &mut Run,
    chunk_table: &impl redb::ReadableTable<&'static [u8; 32], crate::meta::ChunkRow>,
    shared: &Mutex<Captured>,
    hash: ChunkHash,
    data: &[u8],
) -> Result<(), SnapshotError> {
    {
        let captured = shared.lock().unwrap_or_else(|p| p.into_inner());
        if captured.new_chunks.contains_key(&hash) || captured.existing.contains_key(&hash) {
            return Ok(());
        }
    }
    if run.contains(&hash) {
        return Ok(());
    }
    if let Some((loc, _)) = index::lookup(chunk_table, &hash)? {
        shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .existing
            .insert(hash, loc);
        return Ok(());
    }
    match compressor.compress(data) {
        Some(compressed) => run.push(hash, Codec::Zstd, &compressed, data.len()),
        None => run.push(hash, Codec::Raw, data, data.len()),
    }
    Ok(())
}

/// Adds the capture's entries and chunk references inside `txn`. Returns the space
/// to free once the transaction has committed: copies another capture stored first.
pub fn commit_entries(
    txn: &redb::WriteTransaction,
    job: &CaptureJob,
    captured: &Captured,
) -> Result<Vec<(ChunkHash, ChunkLocation)>, SnapshotError> {
    let mut refs: HashMap<ChunkHash, u64> = HashMap::new();
    for (block, content) in &captured.entries {
        manifest::insert(txn, job.lineage, *block, job.snapshot, *content)?;
        if let BlockContent::Chunk(hash) = content {
            *refs.entry(*hash).or_default() += 1;
        }
    }
    let mut chunks = txn.open_table(CHUNKS).map_err(MetaError::from)?;
    let mut garbage = captured.duplicates.clone();
    for (hash, count) in refs {
        if let Some(&loc) = captured.new_chunks.get(&hash) {
            let kept = index::add_refs(&mut chunks, &hash, loc, count)?;
            if kept != loc {
                garbage.push((hash, loc));
            }
        } else if let Some(&loc) = captured.existing.get(&hash) {
            // If a deletion removed the row since the lookup, the bytes are still in
            // place (space is not freed while a capture runs) and the row comes back.
            index::add_refs(&mut chunks, &hash, loc, count)?;
        } else {
            warn!("snapshot {}: chunk {hash} has no location", job.snapshot);
            return Err(SnapshotError::CaptureFailed(format!(
                "chunk {hash} was never stored"
            )));
        }
    }
    Ok(garbage)
}

//! The capture: turns a [`Freeze`] into a completed snapshot.
//!
//! Workers take the frozen blocks in units (one word of the capture set, or up to 64
//! re-examined blocks),
//! hash them, skip those identical to the base snapshot, and store each new chunk
//! once (a stored copy is reused only if it verifies): compressed, appended to a pack
//! this capture owns as one contiguous run per
//! unit. A unit's manifest entries are published together with its run, so a published
//! entry only ever names a chunk already written.
//!
//! Published entries are committed in batches of [`BATCH_ENTRIES`] (fewer for blocks
//! larger than 16 KiB: at most [`BATCH_BYTES`] of blocks): the pack is
//! fsynced, then one transaction adds the entries and their chunk references. Memory
//! and transaction size stay bounded whatever the size of the volume. The entries of a
//! pending snapshot are read only by readers of its pending image, for blocks marked
//! done after their batch committed (the rest they read from the freeze); no snapshot
//! newer than one being captured exists (one capture per volume at a time), so nothing
//! else resolves through them. The last batch commits with the status; a capture that
//! fails has its committed entries removed before it is marked `error`; one a
//! `kill -9` interrupts resumes at the next start, skipping the blocks whose entries
//! are committed (see [`super::recovery`]).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use log::warn;

use crate::namespace::tables::{CHUNKS, MANIFEST};
use crate::namespace::{Chain, Namespace, NamespaceError, SnapshotId, VolumeId};
use crate::storage::Storage;
use crate::storage::direct::AlignedBuf;
use crate::store::codec::{ChunkHash, Codec, Compressor};
use crate::store::index::Existing;
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
pub struct CaptureJob<S: Storage> {
    pub snapshot: SnapshotId,
    pub lineage: VolumeId,
    /// Where the snapshot this one is incremental against reads its blocks (empty:
    /// no base, everything not zero is a change).
    pub base: Chain,
    pub volume: Arc<Volume<S>>,
    pub freeze: Arc<Freeze<S>>,
    pub progress: Arc<CaptureProgress>,
    /// Entries committed before a restart interrupted the capture (see
    /// [`super::recovery`]): changed blocks counted in `info`.
    pub committed_before: u64,
}

/// Most manifest entries committed per transaction while a capture runs.
pub const BATCH_ENTRIES: usize = 16_384;

/// Most bytes of blocks per batch: with large blocks a batch closes sooner, so that
/// its chunks may go up to a bucket while the capture goes on (see `committed`).
pub const BATCH_BYTES: u64 = 256 << 20;

/// Entries per batch for blocks of `block_size` bytes.
fn batch_entries(block_size: u64) -> usize {
    let by_bytes = usize::try_from(BATCH_BYTES / block_size.max(1)).unwrap_or(usize::MAX);
    BATCH_ENTRIES.min(by_bytes).max(1)
}

/// Entries published by the workers and not committed yet, with what they reference.
#[derive(Default)]
pub struct Batch {
    pub entries: Vec<(u64, BlockContent)>,
    /// Chunks this capture wrote.
    pub new_chunks: HashMap<ChunkHash, ChunkLocation>,
    /// Chunks found already stored when looked up.
    pub existing: HashMap<ChunkHash, ChunkLocation>,
    /// Copies written twice by racing workers: never referenced, freed after commit.
    pub duplicates: Vec<(ChunkHash, ChunkLocation)>,
}

impl Batch {
    /// Space this batch wrote that nothing will reference if it is never committed.
    pub fn unreferenced(&self) -> Vec<(ChunkHash, ChunkLocation)> {
        self.new_chunks
            .iter()
            .map(|(h, l)| (*h, *l))
            .chain(self.duplicates.iter().copied())
            .collect()
    }
}

/// What a capture leaves for the engine: the last batch (committed with the status
/// on success, discarded on failure) and the totals for `info`.
#[derive(Default)]
pub struct Captured {
    pub last: Batch,
    pub changed_blocks: u64,
    pub stored_bytes: u64,
}

/// Reads, hashes and stores every block of the freeze on `threads` workers,
/// committing full batches as it goes; `committed` is told the new chunks of each
/// batch once it is durable. Whatever the outcome, the returned [`Captured`] holds
/// the batch that was not committed.
pub fn run<S: Storage>(
    job: &CaptureJob<S>,
    ns: &Namespace,
    store: &ChunkStore<S>,
    writer: &PackWriter<S>,
    threads: usize,
    committed: &(dyn Fn(Vec<ChunkHash>) + Sync),
) -> (Result<(), SnapshotError>, Captured) {
    let shared = Workers {
        job,
        ns,
        store,
        writer,
        committed,
        cursor: AtomicUsize::new(0),
        batch: Mutex::new(Batch::default()),
        committing: Mutex::new(()),
        changed_blocks: AtomicU64::new(job.committed_before),
        stored_bytes: AtomicU64::new(0),
    };
    let planned = plan(job, ns);
    let first_error: Mutex<Option<SnapshotError>> = Mutex::new(planned.err());
    if first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_none()
    {
        std::thread::scope(|scope| {
            for _ in 0..threads.max(1) {
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
    }
    let captured = Captured {
        last: shared.batch.into_inner().unwrap_or_else(|p| p.into_inner()),
        changed_blocks: shared.changed_blocks.into_inner(),
        stored_bytes: shared.stored_bytes.into_inner(),
    };
    let result = if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Err(e)
    } else if job.progress.cancelled.load(Ordering::Relaxed) {
        Err(SnapshotError::Cancelled)
    } else if let Some(failure) = job.freeze.failure() {
        Err(SnapshotError::CaptureFailed(failure))
    } else {
        Ok(())
    };
    (result, captured)
}

/// Plans the re-examined blocks (see [`Freeze::plan_reexamine`]) and sets the
/// progress total. Blocks an older snapshot holds data in are read whatever the live
/// file looks like now: a hole there is a change to record; so are the blocks a
/// volume made from a snapshot still reads from it.
fn plan<S: Storage>(job: &CaptureJob<S>, ns: &Namespace) -> Result<(), SnapshotError> {
    let freeze = &job.freeze;
    let mut older_data = if job.base.is_empty() || freeze.reexamine.is_empty() {
        Vec::new()
    } else {
        let txn = ns.read()?;
        let table = txn.open_table(MANIFEST).map_err(NamespaceError::from)?;
        manifest::nonzero_blocks(&table, &job.base, freeze.reexamine.clone())?
    };
    // A volume made from a snapshot reads the blocks it does not hold yet from that
    // snapshot: a hole in its data file there is not a block of zeros.
    if !freeze.reexamine.is_empty()
        && let Some(source) = job.volume.active_source()
    {
        let end = freeze.reexamine.end.min(source.limit_blocks());
        let range = freeze.reexamine.start..end.max(freeze.reexamine.start);
        let from_source = source.blocks.data_blocks(range).map_err(|e| {
            SnapshotError::CaptureFailed(format!("listing the source snapshot's blocks: {e}"))
        })?;
        older_data.extend(
            from_source
                .into_iter()
                .filter(|&b| freeze.reexamine.contains(&b) && !source.is_own(b)),
        );
    }
    let total = freeze
        .plan_reexamine(job.volume.data_file(), older_data)
        .map_err(|e| SnapshotError::CaptureFailed(format!("planning the capture: {e}")))?;
    job.progress.total_blocks.store(total, Ordering::Relaxed);
    Ok(())
}

/// What the capture workers share.
struct Workers<'a, S: Storage> {
    job: &'a CaptureJob<S>,
    ns: &'a Namespace,
    store: &'a ChunkStore<S>,
    writer: &'a PackWriter<S>,
    committed: &'a (dyn Fn(Vec<ChunkHash>) + Sync),
    /// Next marked unit (word of the capture set) to take; re-examined blocks follow.
    cursor: AtomicUsize,
    /// Published, not yet committed.
    batch: Mutex<Batch>,
    /// One batch commit at a time.
    committing: Mutex<()>,
    changed_blocks: AtomicU64,
    stored_bytes: AtomicU64,
}

/// One unit's results, published at once after its run is written.
#[derive(Default)]
struct UnitResult {
    entries: Vec<(u64, BlockContent)>,
    existing: HashMap<ChunkHash, ChunkLocation>,
}

impl<S: Storage> Workers<'_, S> {
    /// The next blocks to capture: marked units first, then re-examined runs. Asks
    /// for the next marked unit to be read ahead while this one is hashed.
    fn next_unit(&self) -> Vec<u64> {
        let freeze = &self.job.freeze;
        let live = self.job.volume.data_file();
        let unit = self.cursor.fetch_add(1, Ordering::Relaxed);
        if unit < freeze.marked_units() {
            freeze.prefetch(live, &freeze.marked_unit_blocks(unit + 1));
            let blocks = freeze.marked_unit_blocks(unit);
            freeze.prefetch(live, &blocks);
            return blocks;
        }
        let blocks = freeze.next_reexamined();
        freeze.prefetch(live, &blocks);
        blocks
    }
}

fn worker<S: Storage>(workers: &Workers<'_, S>) -> Result<(), SnapshotError> {
    let Workers {
        job,
        ns,
        store,
        writer,
        ..
    } = *workers;
    let live = &*job.volume;
    let mut compressor = Compressor::new(store.compression_level)
        .map_err(|e| SnapshotError::CaptureFailed(format!("zstd: {e}")))?;
    let mut data = Vec::new();
    let mut run = Run::default();
    loop {
        if job.progress.cancelled.load(Ordering::Relaxed) {
            return Ok(());
        }
        let blocks = workers.next_unit();
        if blocks.is_empty() {
            return Ok(());
        }
        // A fresh view per unit: it sees the chunks committed by earlier batches.
        let txn = ns.read()?;
        let manifest_table = txn.open_table(MANIFEST).map_err(NamespaceError::from)?;
        let chunk_table = txn.open_table(CHUNKS).map_err(NamespaceError::from)?;
        let mut result = UnitResult::default();
        for block in blocks {
            // Committed before a restart: its entry stands.
            if job.freeze.is_done(block) {
                job.progress.done_blocks.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            job.freeze
                .take_into(live, block, &mut data)
                .map_err(|e| SnapshotError::CaptureFailed(format!("reading block {block}: {e}")))?;
            let content = if data.iter().all(|&b| b == 0) {
                BlockContent::Zero
            } else {
                BlockContent::Chunk(ChunkHash::of(&data))
            };
            let unchanged = manifest::resolve_chain(&manifest_table, &job.base, block)? == content;
            // A block rewritten with its old contents goes on naming the base's chunk
            // only if that copy verifies, as dedup would require; otherwise it is
            // stored afresh, and the fresh copy replaces the damaged one.
            let unchanged = unchanged
                && match content {
                    BlockContent::Zero => true,
                    BlockContent::Chunk(hash) => index::lookup(&chunk_table, &hash)?
                        .is_some_and(|(loc, _)| store.verify(&hash, loc)),
                };
            if !unchanged {
                if let BlockContent::Chunk(hash) = content {
                    let found = ChunkSources {
                        batch: &workers.batch,
                        unit: &result,
                        run: &run,
                        table: &chunk_table,
                        store,
                    }
                    .find(&hash)?;
                    match found {
                        Found::Stored(Some(loc)) => {
                            result.existing.insert(hash, loc);
                        }
                        Found::Stored(None) => {}
                        Found::Missing => match compressor.compress(&data) {
                            Some(compressed) => {
                                run.push(hash, Codec::Zstd, &compressed, data.len())
                            }
                            None => run.push(hash, Codec::Raw, &data, data.len()),
                        },
                    }
                }
                result.entries.push((block, content));
            }
            job.progress.done_blocks.fetch_add(1, Ordering::Relaxed);
        }
        let written = run.flush(writer)?;
        if let Some(full) = workers.publish(written, result) {
            workers.commit_batch(full)?;
        }
    }
}

/// Where a block's chunk may already be.
enum Found {
    /// Stored: `Some` with its location when known only from the index (the commit
    /// needs it to bring the row back should a deletion remove it meanwhile).
    Stored(Option<ChunkLocation>),
    /// Not stored, or stored only as a copy that failed verification: write it.
    Missing,
}

struct ChunkSources<'a, T, S: Storage> {
    batch: &'a Mutex<Batch>,
    unit: &'a UnitResult,
    run: &'a Run,
    table: &'a T,
    store: &'a ChunkStore<S>,
}

impl<T, S> ChunkSources<'_, T, S>
where
    T: redb::ReadableTable<&'static [u8; 32], crate::namespace::tables::ChunkRow>,
    S: Storage,
{
    fn find(&self, hash: &ChunkHash) -> Result<Found, SnapshotError> {
        if self.run.contains(hash) || self.unit.existing.contains_key(hash) {
            return Ok(Found::Stored(None));
        }
        {
            let batch = self.batch.lock().unwrap_or_else(|p| p.into_inner());
            if batch.new_chunks.contains_key(hash) || batch.existing.contains_key(hash) {
                return Ok(Found::Stored(None));
            }
        }
        Ok(match index::lookup(self.table, hash)? {
            // Dedup never points a snapshot at a copy that does not verify.
            Some((loc, _)) if self.store.verify(hash, loc) => Found::Stored(Some(loc)),
            Some(_) | None => Found::Missing,
        })
    }
}

impl<S: Storage> Workers<'_, S> {
    /// Publishes a unit: its written chunks and its entries. Returns the batch to
    /// commit when this made it full.
    fn publish(&self, written: Vec<(ChunkHash, ChunkLocation)>, unit: UnitResult) -> Option<Batch> {
        let mut batch = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        for (hash, loc) in written {
            match batch.new_chunks.entry(hash) {
                Entry::Occupied(_) => batch.duplicates.push((hash, loc)),
                Entry::Vacant(slot) => {
                    slot.insert(loc);
                    self.stored_bytes
                        .fetch_add(u64::from(loc.stored_len), Ordering::Relaxed);
                }
            }
        }
        self.changed_blocks
            .fetch_add(unit.entries.len() as u64, Ordering::Relaxed);
        batch.entries.extend(unit.entries);
        batch.existing.extend(unit.existing);
        (batch.entries.len() >= batch_entries(self.job.volume.block_size))
            .then(|| std::mem::take(&mut *batch))
    }

    /// Makes a full batch durable: chunks first, then one transaction.
    fn commit_batch(&self, batch: Batch) -> Result<(), SnapshotError> {
        let _one_at_a_time = self.committing.lock().unwrap_or_else(|p| p.into_inner());
        self.writer.pack.sync_data().map_err(|e| {
            SnapshotError::CaptureFailed(format!("syncing pack {}: {e}", self.writer.pack.id))
        })?;
        let garbage = self.ns.change_data(|d| -> Result<_, SnapshotError> {
            let garbage = commit_entries(d.txn(), self.job, &batch, self.store)?;
            d.set_pack_len(self.writer.pack.id, self.writer.end())?;
            Ok(garbage)
        })?;
        self.job
            .freeze
            .mark_done(batch.entries.iter().map(|(block, _)| *block));
        self.store.release(self.ns, garbage);
        (self.committed)(new_chunks_in_block_order(&batch));
        Ok(())
    }
}

/// The chunks a batch stored, each once, in the order of the first block naming it:
/// packs built in this order keep neighbouring blocks together, as reads expect.
fn new_chunks_in_block_order(batch: &Batch) -> Vec<ChunkHash> {
    let mut named: Vec<(u64, ChunkHash)> = batch
        .entries
        .iter()
        .filter_map(|(block, content)| match content {
            BlockContent::Chunk(hash) if batch.new_chunks.contains_key(hash) => {
                Some((*block, *hash))
            }
            _ => None,
        })
        .collect();
    named.sort_unstable_by_key(|(block, _)| *block);
    let mut seen = std::collections::HashSet::new();
    named
        .into_iter()
        .filter_map(|(_, hash)| seen.insert(hash).then_some(hash))
        .collect()
}

/// Chunks a worker encoded but has not written yet: one unit's worth, appended as a
/// single contiguous run so that neighbouring blocks stay neighbours in the pack (a
/// sequential read of the snapshot then reads the pack sequentially). The buffer is
/// page-aligned and every payload padded with zeros to [`pack::PACK_ALIGN`], so the
/// run is one aligned write that bypasses the page cache where the filesystem allows
/// (see [`crate::storage::direct`]): nothing reads it back soon but the upload, and
/// that reads whole runs with direct reads too.
#[derive(Default)]
struct Run {
    bytes: AlignedBuf,
    /// Bytes used in `bytes`: always a multiple of the pack alignment.
    len: usize,
    /// (hash, codec, offset within `bytes`, stored length, plain length)
    chunks: Vec<(ChunkHash, Codec, u64, u32, u32)>,
}

impl Run {
    fn contains(&self, hash: &ChunkHash) -> bool {
        self.chunks.iter().any(|c| c.0 == *hash)
    }

    fn push(&mut self, hash: ChunkHash, codec: Codec, payload: &[u8], plain_len: usize) {
        let at = self.len;
        let end = pack::align_up((at + payload.len()) as u64) as usize;
        let bytes = self.bytes.slice_mut_keeping(end);
        bytes[at..at + payload.len()].copy_from_slice(payload);
        bytes[at + payload.len()..end].fill(0);
        self.len = end;
        self.chunks.push((
            hash,
            codec,
            at as u64,
            payload.len() as u32,
            plain_len as u32,
        ));
    }

    /// Appends the run to the pack; returns where each chunk went.
    fn flush<S: Storage>(
        &mut self,
        writer: &PackWriter<S>,
    ) -> Result<Vec<(ChunkHash, ChunkLocation)>, SnapshotError> {
        if self.chunks.is_empty() {
            return Ok(Vec::new());
        }
        let base = writer.append(self.bytes.slice_mut(self.len)).map_err(|e| {
            SnapshotError::CaptureFailed(format!("writing to pack {}: {e}", writer.pack.id))
        })?;
        let written = self
            .chunks
            .drain(..)
            .map(|(hash, codec, at, stored_len, plain_len)| {
                let loc = ChunkLocation {
                    pack: writer.pack.id,
                    offset: base + at,
                    stored_len,
                    plain_len,
                    codec,
                };
                (hash, loc)
            })
            .collect();
        self.len = 0;
        Ok(written)
    }
}

/// Adds a batch's entries and chunk references inside `txn`. Returns the space to
/// free once the transaction has committed: copies another capture stored first,
/// and damaged copies a fresh one replaced.
pub fn commit_entries<S: Storage>(
    txn: &redb::WriteTransaction,
    job: &CaptureJob<S>,
    batch: &Batch,
    store: &ChunkStore<S>,
) -> Result<Vec<(ChunkHash, ChunkLocation)>, SnapshotError> {
    let mut refs: HashMap<ChunkHash, u64> = HashMap::new();
    for (block, content) in &batch.entries {
        manifest::insert(txn, job.lineage, *block, job.snapshot, *content)?;
        if let BlockContent::Chunk(hash) = content {
            *refs.entry(*hash).or_default() += 1;
        }
    }
    let mut chunks = txn.open_table(CHUNKS).map_err(NamespaceError::from)?;
    let mut garbage = batch.duplicates.clone();
    for (hash, count) in refs {
        if let Some(&loc) = batch.new_chunks.get(&hash) {
            let previous = index::lookup(&chunks, &hash)?.map(|(l, _)| l);
            let existing = if store.is_bad(&hash) {
                Existing::Replace
            } else {
                Existing::Keep
            };
            let kept = index::add_refs(&mut chunks, &hash, loc, count, existing)?;
            if kept != loc {
                garbage.push((hash, loc));
            } else if let Some(damaged) = previous.filter(|&p| p != loc) {
                warn!(
                    "snapshot {}: chunk {hash} stored again; the damaged copy in pack {} is replaced",
                    job.snapshot, damaged.pack
                );
                garbage.push((hash, damaged));
            }
        } else if let Some(&loc) = batch.existing.get(&hash) {
            // If a deletion removed the row since the lookup, the bytes are still in
            // place (space is not freed while a capture runs) and the row comes back.
            index::add_refs(&mut chunks, &hash, loc, count, Existing::Keep)?;
        } else if let Some((loc, _)) = index::lookup(&chunks, &hash)? {
            // Written by this capture and committed with an earlier batch.
            index::add_refs(&mut chunks, &hash, loc, count, Existing::Keep)?;
        } else {
            warn!("snapshot {}: chunk {hash} has no location", job.snapshot);
            return Err(SnapshotError::CaptureFailed(format!(
                "chunk {hash} was never stored"
            )));
        }
    }
    Ok(garbage)
}

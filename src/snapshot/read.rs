//! Reading snapshot images, and the pins that keep an open image readable.
//!
//! Unix semantics for `rmdir` of a snapshot whose `volume.img` is open (a loop device,
//! a `cp` in progress): the name goes at once, the data stays readable through the
//! open handles until the last one closes, and its space comes back after that. An
//! [`OpenImage`] holds the snapshot's record (so it no longer needs the name) and a
//! pin; settling never merges or drops a pinned snapshot's entries, and the last
//! unpin wakes the settler. Pins live in memory: after a restart nothing is open, and
//! start-up settles whatever was left.
//!
//! A pending snapshot's image reads its point in time too. A block the capture has
//! not committed yet reads through the volume's freeze (the live block with the pages
//! preserved since the freeze laid over it: see [`crate::volume::freeze`]); a block
//! whose entry is committed (done) reads its entry, in a read transaction opened
//! after the block was seen done, so that the entry is in it; every other block is as
//! the base snapshot has it. Done only grows, and a block is marked done only after
//! its entry commits, so a frozen read that finds the block still not done afterwards
//! read the frozen bytes. A capture that ends while the image is open leaves every
//! entry committed (completed) or none (failed or cancelled: reads fail with `EIO`).

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use crate::namespace::tables::{CHUNKS, MANIFEST};
use crate::namespace::{Chain, NamespaceError, SnapshotId, SnapshotRecord, SnapshotStatus};
use crate::storage::Storage;
use crate::store::index;
use crate::volume::Volume;
use crate::volume::freeze::Freeze;
use crate::volume::source::SnapshotBlocks;

use super::manifest::{self, BlockContent};
use super::{SnapshotEngine, SnapshotError, SnapshotResult, lock};

/// An open snapshot image: readable until dropped, whatever happens to its name.
pub struct OpenImage<S: Storage> {
    pub record: Arc<SnapshotRecord>,
    engine: Arc<SnapshotEngine<S>>,
    /// Runs of blocks holding data, found on the first `SEEK_DATA`/`SEEK_HOLE`.
    extents: OnceLock<Vec<Range<u64>>>,
    /// While the snapshot is being captured: its volume and freeze.
    frozen: Option<Frozen<S>>,
}

/// The volume and freeze a pending image reads uncaptured blocks through.
#[derive(Clone)]
pub struct Frozen<S: Storage> {
    pub volume: Arc<Volume<S>>,
    pub freeze: Arc<Freeze<S>>,
}

impl<S: Storage> OpenImage<S> {
    pub fn read(&self, buf: &mut [u8], offset: u64) -> SnapshotResult<usize> {
        self.engine
            .read_image(&self.record, self.frozen.as_ref(), buf, offset)
    }

    /// `SEEK_DATA` (`data`) or `SEEK_HOLE` from `offset`: blocks never written or
    /// holding only zeros are holes. `None`: past the end (`ENXIO`).
    pub fn seek(&self, offset: u64, data: bool) -> SnapshotResult<Option<u64>> {
        let size = self.record.size_bytes;
        if offset >= size {
            return Ok(None);
        }
        let extents = match self.extents.get() {
            Some(extents) => extents,
            None => {
                let found = match self.frozen {
                    // Not captured yet: no block is known to be a hole.
                    Some(_) => std::iter::once(0..size.div_ceil(u64::from(self.record.block_size)))
                        .collect(),
                    None => self.engine.data_extents(&self.record)?,
                };
                self.extents.get_or_init(|| found)
            }
        };
        let bs = u64::from(self.record.block_size);
        let block = offset / bs;
        // The first run that ends after `block`.
        let at = extents.partition_point(|run| run.end <= block);
        let run = extents.get(at).filter(|run| run.start * bs < size);
        Ok(Some(match (data, run) {
            (true, Some(run)) => (run.start * bs).max(offset),
            (true, None) => return Ok(None),
            (false, Some(run)) if run.start <= block => (run.end * bs).min(size),
            (false, _) => offset,
        }))
    }
}

impl<S: Storage> Drop for OpenImage<S> {
    fn drop(&mut self) {
        let id = self.record.id;
        let last = {
            let mut pins = lock(&self.engine.pins);
            let count = pins.entry(id).or_insert(1);
            *count -= 1;
            let last = *count == 0;
            if last {
                pins.remove(&id);
            }
            last
        };
        let hidden = || {
            self.engine
                .ns
                .view()
                .snapshots
                .get(&id)
                .is_some_and(|s| s.hidden)
        };
        if last && hidden() {
            self.engine.wake_settler();
        }
    }
}

impl<S: Storage> SnapshotEngine<S> {
    /// Opens the image of visible snapshot `id` for reading: a completed one, or a
    /// pending one (read through its volume's freeze while it is captured). A failed
    /// snapshot has no image (`CaptureFailed`).
    pub fn open_image(self: &Arc<Self>, id: SnapshotId) -> SnapshotResult<OpenImage<S>> {
        // Under the namespace lock, so that no deletion settles between the check
        // and the pin, and no capture ends between the look at the record and the
        // look at the freeze.
        let _guard = self.ns.lock();
        let view = self.ns.view();
        let record = view
            .snapshots
            .get(&id)
            .filter(|s| !s.hidden)
            .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {id}")))?;
        if record.status == SnapshotStatus::Error {
            return Err(SnapshotError::CaptureFailed(format!(
                "snapshot {} failed and has no image: {}",
                record.name(),
                record.error.as_deref().unwrap_or("unknown reason")
            )));
        }
        let frozen = if record.is_capturing() {
            let running = lock(&self.running);
            let (_, frozen) = running
                .get(&id)
                .ok_or_else(|| SnapshotError::NotReady(record.name()))?;
            Some(frozen.clone())
        } else {
            None
        };
        *lock(&self.pins).entry(id).or_insert(0) += 1;
        Ok(OpenImage {
            record: Arc::new(record.clone()),
            engine: self.clone(),
            extents: OnceLock::new(),
            frozen,
        })
    }

    /// Runs of blocks of `record`'s image that hold data (not zeros), in order.
    pub(super) fn data_extents(&self, record: &SnapshotRecord) -> SnapshotResult<Vec<Range<u64>>> {
        let blocks = record.size_bytes.div_ceil(u64::from(record.block_size));
        let chain = self.ns.view().chain(record.lineage, record.id);
        let txn = self.ns.read()?;
        let table = txn.open_table(MANIFEST).map_err(NamespaceError::from)?;
        let mut runs: Vec<Range<u64>> = Vec::new();
        for block in manifest::nonzero_blocks(&table, &chain, 0..blocks)? {
            match runs.last_mut() {
                Some(run) if run.end == block => run.end += 1,
                _ => runs.push(block..block + 1),
            }
        }
        Ok(runs)
    }

    /// Reads `buf.len()` bytes of a snapshot's image at `offset`; `frozen` while it
    /// is pending (see the module documentation).
    pub fn read_image(
        &self,
        record: &SnapshotRecord,
        frozen: Option<&Frozen<S>>,
        buf: &mut [u8],
        offset: u64,
    ) -> SnapshotResult<usize> {
        let end = offset
            .saturating_add(buf.len() as u64)
            .min(record.size_bytes);
        if offset >= end {
            return Ok(0);
        }
        let bs = u64::from(record.block_size);
        // Frozen reads first: the blocks left for the manifest are then looked up
        // in a transaction opened after they were seen done.
        let mut from_manifest = Vec::new();
        let mut block_buf = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let within = (pos % bs) as usize;
            let take = ((bs - within as u64).min(end - pos)) as usize;
            let at = (pos - offset) as usize;
            pos += take as u64;
            if let Some(frozen) = frozen
                && self.read_frozen(record, frozen, block, &mut block_buf)?
            {
                buf[at..at + take].copy_from_slice(&block_buf[within..within + take]);
                continue;
            }
            from_manifest.push((block, at, within, take));
        }
        let chain = self.ns.view().chain(record.lineage, record.id);
        let txn = self.ns.read()?;
        let manifest_table = txn.open_table(MANIFEST).map_err(NamespaceError::from)?;
        let chunk_table = txn.open_table(CHUNKS).map_err(NamespaceError::from)?;
        // Resolve every block first, then read the chunks together.
        let mut pieces = Vec::new();
        let mut chunks = Vec::new();
        for (block, at, within, take) in from_manifest {
            match manifest::resolve_chain(&manifest_table, &chain, block)? {
                BlockContent::Zero => buf[at..at + take].fill(0),
                BlockContent::Chunk(hash) => {
                    let Some((loc, _)) = index::lookup(&chunk_table, &hash)? else {
                        return Err(NamespaceError::Corrupt {
                            what: format!("snapshot {}", record.name()),
                            reason: format!(
                                "block {block} names chunk {hash}, which is not stored"
                            ),
                        }
                        .into());
                    };
                    chunks.push((hash, loc));
                    pieces.push((at, within, take));
                }
            }
        }
        // Blocks only partly read are likely to be read again (a filesystem mounted
        // from the image reads small pieces): keep those decoded.
        let partial = |i: usize| pieces[i].2 < bs as usize;
        self.store.read_chunks(&chunks, partial, |i, plain| {
            let (at, within, take) = pieces[i];
            buf[at..at + take].copy_from_slice(&plain[within..within + take]);
        })?;
        Ok((end - offset) as usize)
    }

    /// Reads `block` of pending snapshot `record` through its freeze into `buf`;
    /// `false` when its entry is to be read instead (committed, or the capture
    /// completed meanwhile).
    fn read_frozen(
        &self,
        record: &SnapshotRecord,
        frozen: &Frozen<S>,
        block: u64,
        buf: &mut Vec<u8>,
    ) -> SnapshotResult<bool> {
        let freeze = &frozen.freeze;
        if !freeze.is_frozen(block) || freeze.is_done(block) {
            return Ok(false);
        }
        match frozen.volume.read_frozen_block(freeze, block, buf) {
            Some(Ok(())) => Ok(!freeze.is_done(block)),
            Some(Err(e)) => Err(SnapshotError::Io {
                what: format!(
                    "reading block {block} of pending snapshot {}",
                    record.name()
                ),
                source: e,
            }),
            None => {
                let completed = self
                    .ns
                    .view()
                    .snapshots
                    .get(&record.id)
                    .is_some_and(|s| s.is_captured());
                if completed {
                    Ok(false)
                } else {
                    Err(SnapshotError::CaptureFailed(format!(
                        "snapshot {} ended without completing",
                        record.name()
                    )))
                }
            }
        }
    }
}

/// The blocks of a snapshot, read through its chain: what a volume made from it
/// reads for blocks it has not written yet (see `volume::source`).
pub struct ChainBlocks<S: Storage> {
    engine: Arc<SnapshotEngine<S>>,
    chain: Chain,
    block_size: u64,
}

impl<S: Storage> ChainBlocks<S> {
    pub fn new(engine: Arc<SnapshotEngine<S>>, chain: Chain, block_size: u64) -> ChainBlocks<S> {
        ChainBlocks {
            engine,
            chain,
            block_size,
        }
    }
}

fn to_io(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl<S: Storage> SnapshotBlocks for ChainBlocks<S> {
    fn read_block(&self, block: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let content = {
            let txn = self.engine.ns.read().map_err(to_io)?;
            let table = txn.open_table(MANIFEST).map_err(to_io)?;
            manifest::resolve_chain(&table, &self.chain, block).map_err(to_io)?
        };
        let BlockContent::Chunk(hash) = content else {
            buf.fill(0);
            return Ok(());
        };
        let loc = {
            let txn = self.engine.ns.read().map_err(to_io)?;
            let table = txn.open_table(CHUNKS).map_err(to_io)?;
            index::lookup(&table, &hash)
                .map_err(to_io)?
                .ok_or_else(|| {
                    to_io(format!(
                        "block {block} names chunk {hash}, which is not stored"
                    ))
                })?
                .0
        };
        let len = buf.len().min(self.block_size as usize);
        self.engine
            .store
            .read_chunks(
                &[(hash, loc)],
                |_| true,
                |_, plain| {
                    buf[..len].copy_from_slice(&plain[..len]);
                },
            )
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
    }

    /// One range scan of the manifest per snapshot of the chain, over `blocks` only.
    fn data_blocks(&self, blocks: Range<u64>) -> std::io::Result<Vec<u64>> {
        let txn = self.engine.ns.read().map_err(to_io)?;
        let table = txn.open_table(MANIFEST).map_err(to_io)?;
        manifest::nonzero_blocks(&table, &self.chain, blocks).map_err(to_io)
    }
}

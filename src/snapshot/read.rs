//! Reading snapshot images, and the pins that keep an open image readable.
//!
//! Unix semantics for `rmdir` of a snapshot whose `volume.img` is open (a loop device,
//! a `cp` in progress): the name goes at once, the data stays readable through the
//! open handles until the last one closes, and its space comes back after that. An
//! [`OpenImage`] holds the snapshot's record (so it no longer needs the name) and a
//! pin; settling never merges or drops a pinned snapshot's entries, and the last
//! unpin wakes the settler. Pins live in memory: after a restart nothing is open, and
//! start-up settles whatever was left.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use crate::namespace::tables::{CHUNKS, MANIFEST};
use crate::namespace::{Chain, NamespaceError, SnapshotId, SnapshotRecord, SnapshotStatus};
use crate::storage::Storage;
use crate::store::index;
use crate::volume::source::SnapshotBlocks;

use super::manifest::{self, BlockContent};
use super::{SnapshotEngine, SnapshotError, SnapshotResult, lock};

/// An open snapshot image: readable until dropped, whatever happens to its name.
pub struct OpenImage<S: Storage> {
    pub record: Arc<SnapshotRecord>,
    engine: Arc<SnapshotEngine<S>>,
    /// Runs of blocks holding data, found on the first `SEEK_DATA`/`SEEK_HOLE`.
    extents: OnceLock<Vec<Range<u64>>>,
}

impl<S: Storage> OpenImage<S> {
    pub fn read(&self, buf: &mut [u8], offset: u64) -> SnapshotResult<usize> {
        self.engine.read_image(&self.record, buf, offset)
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
                let found = self.engine.data_extents(&self.record)?;
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
    /// Opens the image of visible snapshot `id` for reading. Only a completed
    /// snapshot has one: `NotReady` while pending, `CaptureFailed` after an error.
    pub fn open_image(self: &Arc<Self>, id: SnapshotId) -> SnapshotResult<OpenImage<S>> {
        // Under the namespace lock, so that no deletion settles between the check
        // and the pin.
        let _guard = self.ns.lock();
        let view = self.ns.view();
        let record = view
            .snapshots
            .get(&id)
            .filter(|s| !s.hidden)
            .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {id}")))?;
        match record.status {
            SnapshotStatus::Completed => {}
            SnapshotStatus::Pending => return Err(SnapshotError::NotReady(record.name())),
            SnapshotStatus::Error => {
                return Err(SnapshotError::CaptureFailed(format!(
                    "snapshot {} failed and has no image: {}",
                    record.name(),
                    record.error.as_deref().unwrap_or("unknown reason")
                )));
            }
        }
        *lock(&self.pins).entry(id).or_insert(0) += 1;
        Ok(OpenImage {
            record: Arc::new(record.clone()),
            engine: self.clone(),
            extents: OnceLock::new(),
        })
    }

    /// Runs of blocks of `record`'s image that hold data (not zeros), in order.
    fn data_extents(&self, record: &SnapshotRecord) -> SnapshotResult<Vec<Range<u64>>> {
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

    /// Reads `buf.len()` bytes of a completed snapshot's image at `offset`.
    pub fn read_image(
        &self,
        record: &SnapshotRecord,
        buf: &mut [u8],
        offset: u64,
    ) -> SnapshotResult<usize> {
        if record.status != SnapshotStatus::Completed {
            return Err(SnapshotError::NotReady(record.name()));
        }
        let end = offset
            .saturating_add(buf.len() as u64)
            .min(record.size_bytes);
        if offset >= end {
            return Ok(0);
        }
        let bs = u64::from(record.block_size);
        let chain = self.ns.view().chain(record.lineage, record.id);
        let txn = self.ns.read()?;
        let manifest_table = txn.open_table(MANIFEST).map_err(NamespaceError::from)?;
        let chunk_table = txn.open_table(CHUNKS).map_err(NamespaceError::from)?;
        // Resolve every block first, then read the chunks together.
        let mut pieces = Vec::new();
        let mut chunks = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let within = (pos % bs) as usize;
            let take = ((bs - within as u64).min(end - pos)) as usize;
            let at = (pos - offset) as usize;
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
            pos += take as u64;
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

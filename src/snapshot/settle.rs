//! Settling deleted snapshots: a hidden snapshot with a completed successor merges
//! into it; one whose volume is gone (and with no capture pending) is dropped. Large
//! deletions settle in bounded transactions on a background thread, so no deletion
//! holds up other namespace changes for long. A pinned snapshot (an open image) waits.
//!
//! A batch's transaction and the freeing of the space it released go together: a
//! stop waits for the batch at hand (see [`SnapshotEngine::stop_settler`]), since a
//! clean stop is followed by no reclaim of leaked space. Batches not started are
//! settled by the next start.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use log::error;

use crate::namespace::{Change, SnapshotId, SnapshotRecord, VolumeId};
use crate::storage::Storage;
use crate::store::ChunkLocation;
use crate::store::codec::ChunkHash;

use super::{Scheduling, SnapshotEngine, SnapshotResult, lock, lower_thread_priority, manifest};

/// Manifest entries one transaction moves or drops while settling deletions: bounds
/// how long a deletion holds up other namespace changes.
pub const SETTLE_BATCH: usize = 16_384;

/// What settling hidden snapshots left to do after a transaction.
pub struct Settle {
    /// Chunks no entry references any more, to free once the transaction committed.
    pub freed: Vec<(ChunkHash, ChunkLocation)>,
    budget: usize,
    /// Hidden snapshots still have entries to settle.
    pub more: bool,
}

impl Settle {
    pub fn new(budget: usize) -> Settle {
        Settle {
            freed: Vec::new(),
            budget,
            more: false,
        }
    }

    /// Settles the hidden snapshots of `lineage` within the budget. A hidden
    /// snapshot's record goes once it has no entries left.
    pub fn collect_hidden(
        &mut self,
        c: &mut Change<'_>,
        lineage: VolumeId,
        pinned: &HashSet<SnapshotId>,
    ) -> SnapshotResult<()> {
        let volume_alive = c.records().volumes.contains_key(&lineage);
        let snapshots: Vec<SnapshotRecord> = c.records().lineage(lineage).cloned().collect();
        let pending = snapshots.iter().any(SnapshotRecord::is_capturing);
        for hidden in snapshots.iter().filter(|s| s.hidden) {
            // An open image reads it; a volume made from it reads through it.
            if pinned.contains(&hidden.id) || c.records().has_dependents(lineage, hidden.id) {
                continue;
            }
            let successor = snapshots
                .iter()
                .find(|s| s.id > hidden.id && s.is_captured())
                .map(|s| s.id);
            if successor.is_none() && (volume_alive || pending) {
                continue;
            }
            if self.budget == 0 {
                self.more = true;
                return Ok(());
            }
            let step =
                manifest::remove_snapshot(c.txn(), lineage, hidden.id, successor, self.budget)?;
            self.budget = self.budget.saturating_sub(step.processed);
            self.freed.extend(step.freed);
            if step.done {
                c.remove_snapshot(hidden.id)?;
            } else {
                self.budget = 0;
                self.more = true;
                return Ok(());
            }
        }
        self.release_parent(c, lineage, pinned)
    }

    /// A lineage made from a snapshot that has nothing left (no volume, no snapshot)
    /// no longer holds its parent: forget the link and settle the parent's lineage,
    /// whose deleted snapshot may have been kept only for it.
    fn release_parent(
        &mut self,
        c: &mut Change<'_>,
        lineage: VolumeId,
        pinned: &HashSet<SnapshotId>,
    ) -> SnapshotResult<()> {
        if c.records().lineage_alive(lineage) {
            return Ok(());
        }
        let Some(parent) = c.records().lineage_parents.get(&lineage).copied() else {
            return Ok(());
        };
        c.remove_lineage_parent(lineage)?;
        self.collect_hidden(c, parent.lineage, pinned)
    }
}

impl<S: Storage> SnapshotEngine<S> {
    /// Snapshots with open images.
    pub(super) fn pinned(&self) -> HashSet<SnapshotId> {
        lock(&self.pins).keys().copied().collect()
    }

    /// Frees the space a committed transaction released, and has hidden snapshots it
    /// had no budget left for settled. Called without the namespace lock.
    pub fn settled(&self, settle: Settle) {
        self.store.release(&self.ns, settle.freed);
        if settle.more {
            self.wake_settler();
        }
    }

    pub(super) fn wake_settler(&self) {
        if self.scheduling == Scheduling::Manual {
            if let Err(e) = self.settle_all() {
                error!("settling deleted snapshots: {e}");
            }
            return;
        }
        lock(&self.settle_signal.state).pending = true;
        self.settle_signal.changed.notify_one();
    }

    /// Starts the thread that settles large deletions in the background, one bounded
    /// transaction at a time (threaded scheduling only).
    pub fn start_settler(self: &Arc<Self>) {
        if self.scheduling == Scheduling::Manual {
            return;
        }
        let engine = Arc::downgrade(self);
        let signal = self.settle_signal.clone();
        let spawned = std::thread::Builder::new()
            .name("settler".into())
            .spawn(move || {
                lower_thread_priority();
                loop {
                    {
                        let mut state = lock(&signal.state);
                        while !state.pending && !state.stopped {
                            state = signal
                                .changed
                                .wait(state)
                                .unwrap_or_else(|p| p.into_inner());
                        }
                        if state.stopped {
                            return;
                        }
                        state.pending = false;
                    }
                    let Some(engine) = engine.upgrade() else {
                        return;
                    };
                    if let Err(e) = engine.settle_all() {
                        error!("settling deleted snapshots: {e}");
                    }
                }
            });
        match spawned {
            Ok(thread) => *lock(&self.settler_thread) = Some(thread),
            Err(e) => error!(
                "cannot start the settler thread: {e}; deleted snapshots settle at the next start"
            ),
        }
    }

    /// Stops the settler thread once the batch at hand is committed and its space
    /// freed. Must not be called from the settler thread.
    pub fn stop_settler(&self) {
        lock(&self.settle_signal.state).stopped = true;
        self.settle_signal.changed.notify_all();
        let thread = lock(&self.settler_thread).take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            error!("the settler thread panicked");
        }
    }

    /// Settles hidden snapshots until none can progress, a batch at a time.
    pub(super) fn settle_all(&self) -> SnapshotResult<()> {
        loop {
            let settle = {
                let guard = self.ns.lock();
                let pins = self.pinned();
                self.ns.change(&guard, |c| -> SnapshotResult<Settle> {
                    let mut settle = Settle::new(SETTLE_BATCH);
                    let lineages: BTreeSet<VolumeId> = c
                        .records()
                        .snapshots
                        .values()
                        .filter(|s| s.hidden)
                        .map(|s| s.lineage)
                        .collect();
                    for lineage in lineages {
                        settle.collect_hidden(c, lineage, &pins)?;
                    }
                    Ok(settle)
                })?
            };
            let more = settle.more;
            self.store.release(&self.ns, settle.freed);
            if !more || lock(&self.settle_signal.state).stopped {
                return Ok(());
            }
        }
    }
}

//! Manifests: which chunk each block of each snapshot holds.
//!
//! A volume's snapshots form a *lineage* (the volume id). Snapshot `s` stores entries
//! only for the blocks that changed since its predecessor: `(lineage, block, s) → hash`
//! (or [`ZERO_BLOCK`]). Block `b` of snapshot `s` is the entry with the greatest id
//! `≤ s` for `(lineage, b)`; no entry means the block was never written (zeros). One
//! B-tree seek answers it, so every snapshot resolves any block on its own, while
//! writing a snapshot costs O(changed blocks).
//!
//! Deleting snapshot `k` *merges* it into its successor `k'`: an entry of `k` that `k'`
//! overrides (an entry in `(k, k']`) is dropped; any other moves to `k'`, which now
//! needs it. Only dropped entries release chunk references. Each entry holds exactly
//! one reference on its chunk.

use redb::{ReadTransaction, ReadableTable, Table, WriteTransaction};

use crate::namespace::tables::{CHUNKS, ChunkRow, MANIFEST, SNAPSHOT_BLOCKS, ZERO_BLOCK};
use crate::namespace::{NamespaceError, NsResult, SnapshotId, SnapshotRef, VolumeId};
use crate::store::ChunkLocation;
use crate::store::codec::ChunkHash;
use crate::store::index;

/// What a block of a snapshot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockContent {
    Zero,
    Chunk(ChunkHash),
}

impl BlockContent {
    pub fn from_raw(raw: [u8; 32]) -> BlockContent {
        if raw == ZERO_BLOCK {
            BlockContent::Zero
        } else {
            BlockContent::Chunk(ChunkHash(raw))
        }
    }

    pub fn to_raw(self) -> [u8; 32] {
        match self {
            BlockContent::Zero => ZERO_BLOCK,
            BlockContent::Chunk(hash) => hash.0,
        }
    }
}

pub type ManifestTable<'t> = Table<'t, (u64, u64, u64), &'static [u8; 32]>;

/// Block `block` as snapshot `snapshot` of `lineage` sees it, in that lineage alone.
pub fn resolve(
    table: &impl ReadableTable<(u64, u64, u64), &'static [u8; 32]>,
    lineage: VolumeId,
    block: u64,
    snapshot: SnapshotId,
) -> NsResult<BlockContent> {
    Ok(
        newest_entry(table, SnapshotRef { lineage, snapshot }, block)?
            .unwrap_or(BlockContent::Zero),
    )
}

/// The newest entry for `block` at or before `point`, in `point`'s lineage alone.
fn newest_entry(
    table: &impl ReadableTable<(u64, u64, u64), &'static [u8; 32]>,
    point: SnapshotRef,
    block: u64,
) -> NsResult<Option<BlockContent>> {
    let (lineage, snapshot) = (point.lineage.0, point.snapshot.0);
    let mut range = table.range((lineage, block, 0)..=(lineage, block, snapshot))?;
    match range.next_back() {
        Some(row) => Ok(Some(BlockContent::from_raw(*row?.1.value()))),
        None => Ok(None),
    }
}

/// Block `block` as the first point of `chain` sees it: each point's lineage is asked
/// in turn, the first with an entry decides; none means zeros. A volume made from a
/// snapshot has that snapshot's chain after its own lineage.
pub fn resolve_chain(
    table: &impl ReadableTable<(u64, u64, u64), &'static [u8; 32]>,
    chain: &[SnapshotRef],
    block: u64,
) -> NsResult<BlockContent> {
    for &point in chain {
        if let Some(content) = newest_entry(table, point, block)? {
            return Ok(content);
        }
    }
    Ok(BlockContent::Zero)
}

/// The blocks in `range` where the first point of `chain` holds anything but zeros,
/// in order, visiting only the chain's entries in the range.
pub fn nonzero_blocks(
    table: &impl ReadableTable<(u64, u64, u64), &'static [u8; 32]>,
    chain: &[SnapshotRef],
    range: std::ops::Range<u64>,
) -> NsResult<Vec<u64>> {
    let mut decided: std::collections::BTreeMap<u64, bool> = std::collections::BTreeMap::new();
    if range.is_empty() {
        return Ok(Vec::new());
    }
    for &point in chain {
        // Per block, the newest entry at or before the point decides within the
        // lineage; a block an earlier point decided keeps that decision.
        let (lineage, snapshot) = (point.lineage.0, point.snapshot.0);
        let rows = table.range((lineage, range.start, 0)..=(lineage, range.end - 1, u64::MAX))?;
        let mut newest: Option<(u64, bool)> = None;
        let settle = |entry: Option<(u64, bool)>,
                      decided: &mut std::collections::BTreeMap<u64, bool>| {
            if let Some((block, nonzero)) = entry {
                decided.entry(block).or_insert(nonzero);
            }
        };
        for row in rows {
            let (key, value) = row?;
            let (_, block, id) = key.value();
            if id > snapshot {
                continue;
            }
            let nonzero = *value.value() != ZERO_BLOCK;
            match &mut newest {
                Some((b, state)) if *b == block => *state = nonzero,
                _ => {
                    settle(newest.take(), &mut decided);
                    newest = Some((block, nonzero));
                }
            }
        }
        settle(newest, &mut decided);
    }
    Ok(decided
        .into_iter()
        .filter_map(|(block, nonzero)| nonzero.then_some(block))
        .collect())
}

/// Records that snapshot `snapshot` holds `content` at `block`. The caller accounts
/// for the chunk reference the entry carries.
pub fn insert(
    txn: &WriteTransaction,
    lineage: VolumeId,
    block: u64,
    snapshot: SnapshotId,
    content: BlockContent,
) -> NsResult<()> {
    let (lineage, snapshot) = (lineage.0, snapshot.0);
    let previous = txn
        .open_table(MANIFEST)?
        .insert((lineage, block, snapshot), &content.to_raw())?
        .map(|old| BlockContent::from_raw(*old.value()));
    if previous.is_some() {
        return Err(NamespaceError::Corrupt {
            what: format!("manifest of snapshot {snapshot}"),
            reason: format!("block {block} recorded twice"),
        });
    }
    txn.open_table(SNAPSHOT_BLOCKS)?
        .insert((snapshot, block), ())?;
    Ok(())
}

/// Up to `limit` of the blocks snapshot `snapshot` has its own entries for.
/// The blocks snapshot `snapshot` has entries for, in order (those a capture
/// committed so far, for a snapshot still being captured).
pub fn committed_blocks(txn: &ReadTransaction, snapshot: SnapshotId) -> NsResult<Vec<u64>> {
    let table = txn.open_table(SNAPSHOT_BLOCKS)?;
    let mut blocks = Vec::new();
    for row in table.range((snapshot.0, 0)..=(snapshot.0, u64::MAX))? {
        blocks.push(row?.0.value().1);
    }
    Ok(blocks)
}

fn own_blocks(txn: &WriteTransaction, snapshot: u64, limit: usize) -> NsResult<Vec<u64>> {
    let table = txn.open_table(SNAPSHOT_BLOCKS)?;
    let mut blocks = Vec::new();
    for row in table
        .range((snapshot, 0)..=(snapshot, u64::MAX))?
        .take(limit)
    {
        blocks.push(row?.0.value().1);
    }
    Ok(blocks)
}

fn release(
    chunks: &mut Table<'_, &'static [u8; 32], ChunkRow>,
    content: BlockContent,
    freed: &mut Vec<(ChunkHash, ChunkLocation)>,
) -> NsResult<()> {
    if let BlockContent::Chunk(hash) = content
        && let Some(loc) = index::drop_ref(chunks, &hash)?
    {
        freed.push((hash, loc));
    }
    Ok(())
}

/// What one step of removing a snapshot's entries did.
pub struct Removal {
    /// Chunks no entry references any more (freed after the transaction commits).
    pub freed: Vec<(ChunkHash, ChunkLocation)>,
    /// Entries moved or dropped.
    pub processed: usize,
    /// Whether the snapshot has no entries left.
    pub done: bool,
}

/// Removes up to `max_entries` of snapshot `snapshot`'s entries. With a `successor`,
/// entries it still needs move to it; the rest are dropped.
///
/// Large snapshots are removed over several transactions. Every intermediate state
/// reads the same: an entry not yet moved is still the newest one at or before the
/// successor, exactly as the moved one will be.
pub fn remove_snapshot(
    txn: &WriteTransaction,
    lineage: VolumeId,
    snapshot: SnapshotId,
    successor: Option<SnapshotId>,
    max_entries: usize,
) -> NsResult<Removal> {
    let (lineage, snapshot, successor) = (lineage.0, snapshot.0, successor.map(|s| s.0));
    let mut blocks = own_blocks(txn, snapshot, max_entries.saturating_add(1))?;
    let done = blocks.len() <= max_entries;
    blocks.truncate(max_entries);
    let mut manifest: ManifestTable<'_> = txn.open_table(MANIFEST)?;
    let mut reverse = txn.open_table(SNAPSHOT_BLOCKS)?;
    let mut chunks = txn.open_table(CHUNKS)?;
    let mut freed = Vec::new();
    let processed = blocks.len();
    for block in blocks {
        reverse.remove((snapshot, block))?;
        let Some(raw) = manifest.remove((lineage, block, snapshot))? else {
            continue;
        };
        let content = BlockContent::from_raw(*raw.value());
        drop(raw);
        let keep_for = match successor {
            Some(next) => {
                let overridden = manifest
                    .range((lineage, block, snapshot + 1)..=(lineage, block, next))?
                    .next()
                    .is_some();
                (!overridden).then_some(next)
            }
            None => None,
        };
        match keep_for {
            Some(next) => {
                manifest.insert((lineage, block, next), &content.to_raw())?;
                reverse.insert((next, block), ())?;
            }
            None => release(&mut chunks, content, &mut freed)?,
        }
    }
    Ok(Removal {
        freed,
        processed,
        done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::Namespace;
    use crate::storage::Storage;
    use crate::storage::memory::MemStorage;
    use crate::store::codec::Codec;
    use crate::store::index::Existing;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn hash(n: u8) -> ChunkHash {
        ChunkHash::of(&[n])
    }

    fn loc(n: u8) -> ChunkLocation {
        ChunkLocation {
            pack: 1,
            offset: u64::from(n) * 4096,
            stored_len: 1,
            plain_len: 1,
            codec: Codec::Raw,
        }
    }

    fn namespace() -> Namespace {
        let storage = MemStorage::new();
        storage.create_dir_all(std::path::Path::new("/d")).unwrap();
        Namespace::open(&storage, std::path::Path::new("/d/m.redb"), true).unwrap()
    }

    /// Writes a snapshot's delta the way a capture commit does: entry + reference.
    fn commit_delta(
        ns: &Namespace,
        lineage: u64,
        snapshot: u64,
        delta: &BTreeMap<u64, Option<u8>>,
    ) {
        ns.change_data(|d| -> NsResult<()> {
            let txn = d.txn();
            for (&block, &content) in delta {
                let content = match content {
                    Some(n) => {
                        let mut chunks = txn.open_table(CHUNKS)?;
                        index::add_refs(&mut chunks, &hash(n), loc(n), 1, Existing::Keep)?;
                        BlockContent::Chunk(hash(n))
                    }
                    None => BlockContent::Zero,
                };
                insert(txn, VolumeId(lineage), block, SnapshotId(snapshot), content)?;
            }
            Ok(())
        })
        .unwrap();
    }

    fn remove(
        ns: &Namespace,
        lineage: u64,
        victim: u64,
        successor: Option<u64>,
        batch: usize,
    ) -> Removal {
        ns.change_data(|d| {
            remove_snapshot(
                d.txn(),
                VolumeId(lineage),
                SnapshotId(victim),
                successor.map(SnapshotId),
                batch,
            )
        })
        .unwrap()
    }

    fn read_all(ns: &Namespace, lineage: u64, snapshot: u64, blocks: u64) -> Vec<BlockContent> {
        let txn = ns.read().unwrap();
        let table = txn.open_table(MANIFEST).unwrap();
        (0..blocks)
            .map(|b| resolve(&table, VolumeId(lineage), b, SnapshotId(snapshot)).unwrap())
            .collect()
    }

    fn chunk_refs(ns: &Namespace) -> BTreeMap<ChunkHash, u64> {
        let txn = ns.read().unwrap();
        let table = txn.open_table(CHUNKS).unwrap();
        table
            .range::<&[u8; 32]>(..)
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                (ChunkHash(*k.value()), v.value().5)
            })
            .collect()
    }

    const BLOCKS: u64 = 6;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Against a model that stores every snapshot in full: any sequence of
        /// snapshots and deletions leaves every survivor reading back its full image,
        /// and reference counts equal the entries that remain.
        #[test]
        fn survivors_always_read_back_their_full_image(
            deltas in prop::collection::vec(
                prop::collection::btree_map(0..BLOCKS, prop::option::of(0u8..5), 0..4), 1..7),
            deletions in prop::collection::vec(any::<prop::sample::Index>(), 0..7),
            batch in 1usize..4,
        ) {
            let ns = namespace();
            let lineage = 9;
            let mut model: BTreeMap<u64, Vec<BlockContent>> = BTreeMap::new();
            let mut image = vec![BlockContent::Zero; BLOCKS as usize];
            for (i, delta) in deltas.iter().enumerate() {
                let id = i as u64 * 2 + 1;
                commit_delta(&ns, lineage, id, delta);
                for (&b, &c) in delta {
                    image[b as usize] = c.map_or(BlockContent::Zero, |n| BlockContent::Chunk(hash(n)));
                }
                model.insert(id, image.clone());
            }
            for pick in deletions {
                if model.is_empty() {
                    break;
                }
                let ids: Vec<u64> = model.keys().copied().collect();
                let victim = ids[pick.index(ids.len())];
                let successor = ids.iter().copied().find(|&id| id > victim);
                model.remove(&victim);
                // Removal in small steps: every intermediate state reads correctly.
                loop {
                    let step = remove(&ns, lineage, victim, successor, batch);
                    for (&id, expected) in &model {
                        prop_assert_eq!(&read_all(&ns, lineage, id, BLOCKS), expected, "snapshot {} while deleting {}", id, victim);
                    }
                    if step.done {
                        break;
                    }
                }
            }
            // Every remaining entry holds one reference; nothing else does.
            let txn = ns.read().unwrap();
            let manifest = txn.open_table(MANIFEST).unwrap();
            let mut expected_refs: BTreeMap<ChunkHash, u64> = BTreeMap::new();
            for row in manifest.range::<(u64, u64, u64)>(..).unwrap() {
                if let BlockContent::Chunk(h) = BlockContent::from_raw(*row.unwrap().1.value()) {
                    *expected_refs.entry(h).or_default() += 1;
                }
            }
            prop_assert_eq!(chunk_refs(&ns), expected_refs);
        }
    }

    #[test]
    fn nonzero_blocks_follow_the_newest_entry_at_or_before_the_snapshot() {
        let ns = namespace();
        commit_delta(
            &ns,
            1,
            1,
            &BTreeMap::from([(0, Some(1)), (2, Some(2)), (5, Some(3))]),
        );
        commit_delta(&ns, 1, 2, &BTreeMap::from([(0, None), (3, Some(4))]));
        commit_delta(&ns, 1, 3, &BTreeMap::from([(2, None)]));
        let txn = ns.read().unwrap();
        let table = txn.open_table(MANIFEST).unwrap();
        let point = |lineage, snapshot| SnapshotRef {
            lineage: VolumeId(lineage),
            snapshot: SnapshotId(snapshot),
        };
        let at = |snap, range| nonzero_blocks(&table, &[point(1, snap)], range).unwrap();
        assert_eq!(at(1, 0..10), vec![0, 2, 5]);
        assert_eq!(at(2, 0..10), vec![2, 3, 5]);
        assert_eq!(at(3, 0..10), vec![3, 5]);
        assert_eq!(at(2, 3..5), vec![3]);
        assert_eq!(at(2, 4..4), Vec::<u64>::new());
        drop((table, txn));
        // A lineage made from snapshot 2: its own entries first, then lineage 1 at 2.
        commit_delta(
            &ns,
            7,
            4,
            &BTreeMap::from([(2, None), (3, None), (6, Some(5))]),
        );
        let txn = ns.read().unwrap();
        let table = txn.open_table(MANIFEST).unwrap();
        let chain = [point(7, 4), point(1, 2)];
        assert_eq!(nonzero_blocks(&table, &chain, 0..10).unwrap(), vec![5, 6]);
        let contents: Vec<BlockContent> = (0..7)
            .map(|b| resolve_chain(&table, &chain, b).unwrap())
            .collect();
        assert_eq!(contents[5], BlockContent::Chunk(hash(3)));
        assert_eq!(contents[6], BlockContent::Chunk(hash(5)));
        assert_eq!(contents[2], BlockContent::Zero);
        assert_eq!(contents[0], BlockContent::Zero);
    }

    #[test]
    fn an_entry_whose_chunk_row_is_gone_can_still_be_removed() {
        // Fault: dropping the reference of an entry whose chunk row was lost failed
        // the whole transaction, so the snapshot could never settle and every capture
        // and start-up that tried to settle it failed too.
        let ns = namespace();
        commit_delta(&ns, 1, 1, &BTreeMap::from([(0, Some(1)), (1, Some(2))]));
        ns.change_data(|d| -> NsResult<()> {
            d.txn().open_table(CHUNKS)?.remove(&hash(1).0)?;
            Ok(())
        })
        .unwrap();
        let freed = remove(&ns, 1, 1, None, usize::MAX).freed;
        assert_eq!(freed.iter().map(|(h, _)| *h).collect::<Vec<_>>(), [hash(2)]);
        assert!(chunk_refs(&ns).is_empty());
        assert_eq!(read_all(&ns, 1, 1, 2), [BlockContent::Zero; 2]);
    }

    #[test]
    fn deleting_the_only_holder_frees_the_chunk() {
        let ns = namespace();
        commit_delta(
            &ns,
            1,
            1,
            &BTreeMap::from([(0, Some(1)), (1, Some(1)), (2, None)]),
        );
        commit_delta(&ns, 1, 2, &BTreeMap::from([(0, Some(2))]));
        let freed = remove(&ns, 1, 1, Some(2), usize::MAX).freed;
        // Block 0 was overridden by snapshot 2, block 1 moved: chunk 1 keeps one ref.
        assert!(freed.is_empty());
        assert_eq!(chunk_refs(&ns).get(&hash(1)), Some(&1));
        let freed = remove(&ns, 1, 2, None, usize::MAX).freed;
        let mut freed: Vec<_> = freed.into_iter().map(|(h, _)| h).collect();
        freed.sort();
        let mut expect = vec![hash(1), hash(2)];
        expect.sort();
        assert_eq!(freed, expect);
        assert!(chunk_refs(&ns).is_empty());
    }
}

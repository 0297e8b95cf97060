//! Manifest entries and the chunk references they hold.
//!
//! Checked: each entry's snapshot exists (in the entry's lineage); each entry's chunk
//! has a row; each row's reference count equals the entries naming it; the
//! `snapshot_blocks` index has a row for each entry and none besides.
//!
//! The entry `(lineage, block, s)` is what every snapshot of the lineage from `s` up
//! to the block's next entry reads. That *reach* names the snapshots a damaged chunk
//! affects, and decides what becomes of an entry whose snapshot is gone: if a
//! completed snapshot in its reach exists, that snapshot reads it today, so the
//! repair moves the entry to the first such snapshot (as settling a deletion would
//! have); otherwise nothing reads it and it goes. Either way, nothing an existing
//! snapshot reads changes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use redb::{ReadableTable, WriteTransaction};

use crate::namespace::tables::{CHUNKS, MANIFEST, SNAPSHOT_BLOCKS};
use crate::namespace::{Namespace, NsResult, Records, SnapshotId, SnapshotRecord, SnapshotStatus};
use crate::snapshot::manifest::BlockContent;
use crate::storage::Storage;
use crate::store::codec::ChunkHash;
use crate::store::index;

use super::chunks::ChunkScan;
use super::{CheckError, Checker, Outcome, Problem, Severity, counted};

/// What later steps need from the reference check.
pub(super) struct References {
    /// Visible snapshots that read each damaged or missing chunk, by name.
    pub readers: HashMap<ChunkHash, BTreeSet<String>>,
}

/// An entry whose snapshot does not exist (in its lineage).
struct Stray {
    lineage: u64,
    block: u64,
    snapshot: u64,
    raw: [u8; 32],
    /// The completed snapshot that reads it today, if any: where it moves.
    reader: Option<u64>,
}

#[derive(Default)]
struct Scan {
    entries: u64,
    /// Entries naming each chunk, those of missing snapshots included.
    counts: HashMap<ChunkHash, u64>,
    /// Chunks entries name that have no row: how many entries name each.
    dangling: BTreeMap<ChunkHash, u64>,
    strays: Vec<Stray>,
    reverse_missing: Vec<(u64, u64)>,
    reverse_extra: Vec<(u64, u64)>,
    /// Rows whose count differs from their entries: (hash, references, entries).
    miscounted: Vec<(ChunkHash, u64, u64)>,
    readers: HashMap<ChunkHash, BTreeSet<String>>,
}

/// Snapshot records by lineage, in id order.
struct Lineages {
    records: Arc<Records>,
    by_lineage: HashMap<u64, Vec<SnapshotId>>,
}

impl Lineages {
    fn new(records: Arc<Records>) -> Lineages {
        let mut by_lineage: HashMap<u64, Vec<SnapshotId>> = HashMap::new();
        for s in records.snapshots.values() {
            by_lineage.entry(s.lineage.0).or_default().push(s.id);
        }
        Lineages {
            records,
            by_lineage,
        }
    }

    /// Completed snapshots of `lineage` with ids in `[from, until)`.
    fn completed_in(
        &self,
        lineage: u64,
        from: u64,
        until: Option<u64>,
    ) -> impl Iterator<Item = &SnapshotRecord> {
        self.by_lineage
            .get(&lineage)
            .into_iter()
            .flatten()
            .filter(move |id| id.0 >= from && until.is_none_or(|u| id.0 < u))
            .filter_map(|id| self.records.snapshots.get(id))
            .filter(|s| s.status == SnapshotStatus::Completed)
    }

    fn owns(&self, lineage: u64, snapshot: u64) -> bool {
        self.lineage_of(snapshot) == Some(lineage)
    }

    fn lineage_of(&self, snapshot: u64) -> Option<u64> {
        self.records
            .snapshots
            .get(&SnapshotId(snapshot))
            .map(|s| s.lineage.0)
    }

    fn shown_name(&self, snapshot: u64) -> String {
        match self.records.snapshots.get(&SnapshotId(snapshot)) {
            Some(s) if s.hidden => format!("{} (deleted, id {snapshot})", s.name()),
            Some(s) => s.name(),
            None => format!("snapshot id {snapshot}"),
        }
    }
}

struct Entry {
    lineage: u64,
    block: u64,
    snapshot: u64,
    raw: [u8; 32],
    stray: bool,
}

impl Scan {
    /// Accounts for `entry` once the id of its block's next entry (`next`) is known.
    fn close(
        &mut self,
        entry: Entry,
        next: Option<u64>,
        lineages: &Lineages,
        watch: &dyn Fn(&ChunkHash) -> bool,
    ) {
        if entry.stray {
            let reader = lineages
                .completed_in(entry.lineage, entry.snapshot + 1, next)
                .next()
                .map(|s| s.id.0);
            self.strays.push(Stray {
                lineage: entry.lineage,
                block: entry.block,
                snapshot: entry.snapshot,
                raw: entry.raw,
                reader,
            });
        }
        if let BlockContent::Chunk(hash) = BlockContent::from_raw(entry.raw)
            && (watch(&hash) || self.dangling.contains_key(&hash))
        {
            let names = lineages
                .completed_in(entry.lineage, entry.snapshot, next)
                .filter(|s| !s.hidden)
                .map(SnapshotRecord::name);
            self.readers.entry(hash).or_default().extend(names);
        }
    }
}

fn scan(ns: &Namespace, lineages: &Lineages, watch: &dyn Fn(&ChunkHash) -> bool) -> NsResult<Scan> {
    let txn = ns.read()?;
    let manifest = txn.open_table(MANIFEST)?;
    let reverse = txn.open_table(SNAPSHOT_BLOCKS)?;
    let chunks = txn.open_table(CHUNKS)?;
    let mut scan = Scan::default();
    let mut stray_pairs = HashSet::new();
    let mut previous: Option<Entry> = None;
    for row in manifest.range::<(u64, u64, u64)>(..)? {
        let (key, value) = row?;
        let (lineage, block, snapshot) = key.value();
        let entry = Entry {
            lineage,
            block,
            snapshot,
            raw: *value.value(),
            stray: !lineages.owns(lineage, snapshot),
        };
        scan.entries += 1;
        if entry.stray {
            stray_pairs.insert((snapshot, block));
        }
        if reverse.get((snapshot, block))?.is_none() {
            scan.reverse_missing.push((snapshot, block));
        }
        if let BlockContent::Chunk(hash) = BlockContent::from_raw(entry.raw) {
            *scan.counts.entry(hash).or_default() += 1;
            if chunks.get(&hash.0)?.is_none() {
                *scan.dangling.entry(hash).or_default() += 1;
            }
        }
        if let Some(prev) = previous.take() {
            let next = ((prev.lineage, prev.block) == (lineage, block)).then_some(snapshot);
            scan.close(prev, next, lineages, watch);
        }
        previous = Some(entry);
    }
    if let Some(prev) = previous {
        scan.close(prev, None, lineages, watch);
    }
    for row in reverse.range::<(u64, u64)>(..)? {
        let (snapshot, block) = row?.0.value();
        let matched = stray_pairs.contains(&(snapshot, block))
            || match lineages.lineage_of(snapshot) {
                Some(lineage) => manifest.get((lineage, block, snapshot))?.is_some(),
                None => false,
            };
        if !matched {
            scan.reverse_extra.push((snapshot, block));
        }
    }
    for row in chunks.range::<&[u8; 32]>(..)? {
        let (hash, row) = row?;
        let hash = ChunkHash(*hash.value());
        let refs = row.value().5;
        let entries = scan.counts.get(&hash).copied().unwrap_or(0);
        if refs != entries {
            scan.miscounted.push((hash, refs, entries));
        }
    }
    Ok(scan)
}

/// Applies the repairs `scan` calls for in one transaction: entries of missing
/// snapshots moved to their reader or removed, the `snapshot_blocks` index matched to
/// the entries, then every reference count set to the entries naming its chunk (a row
/// no entry names goes; its space is punched with the other unreferenced space).
/// Returns the counts that changed: (hash, old, new).
fn repair(
    ns: &Namespace,
    lineages: &Lineages,
    scan: &Scan,
) -> NsResult<Vec<(ChunkHash, u64, u64)>> {
    ns.change_data(|d| {
        let txn = d.txn();
        {
            let mut manifest = txn.open_table(MANIFEST)?;
            let mut reverse = txn.open_table(SNAPSHOT_BLOCKS)?;
            let has_entry = |manifest: &crate::snapshot::manifest::ManifestTable<'_>,
                             snapshot: u64,
                             block: u64|
             -> NsResult<bool> {
                Ok(match lineages.lineage_of(snapshot) {
                    Some(lineage) => manifest.get((lineage, block, snapshot))?.is_some(),
                    None => false,
                })
            };
            for stray in &scan.strays {
                manifest.remove((stray.lineage, stray.block, stray.snapshot))?;
                if !has_entry(&manifest, stray.snapshot, stray.block)? {
                    reverse.remove((stray.snapshot, stray.block))?;
                }
                if let Some(reader) = stray.reader {
                    manifest.insert((stray.lineage, stray.block, reader), &stray.raw)?;
                    reverse.insert((reader, stray.block), ())?;
                }
            }
            for &(snapshot, block) in &scan.reverse_missing {
                if has_entry(&manifest, snapshot, block)? {
                    reverse.insert((snapshot, block), ())?;
                }
            }
            for &(snapshot, block) in &scan.reverse_extra {
                if !has_entry(&manifest, snapshot, block)? {
                    reverse.remove((snapshot, block))?;
                }
            }
        }
        recount(txn)
    })
}

/// Sets every reference count to the number of entries naming its chunk.
fn recount(txn: &WriteTransaction) -> NsResult<Vec<(ChunkHash, u64, u64)>> {
    let mut counts: HashMap<ChunkHash, u64> = HashMap::new();
    for row in txn.open_table(MANIFEST)?.range::<(u64, u64, u64)>(..)? {
        if let BlockContent::Chunk(hash) = BlockContent::from_raw(*row?.1.value()) {
            *counts.entry(hash).or_default() += 1;
        }
    }
    let mut chunks = txn.open_table(CHUNKS)?;
    let mut changed = Vec::new();
    for row in chunks.range::<&[u8; 32]>(..)? {
        let (hash, row) = row?;
        let hash = ChunkHash(*hash.value());
        let (refs, entries) = (row.value().5, counts.get(&hash).copied().unwrap_or(0));
        if refs != entries {
            changed.push((hash, refs, entries));
        }
    }
    for &(hash, _, entries) in &changed {
        index::set_refs(&mut chunks, &hash, entries)?;
    }
    Ok(changed)
}

impl<S: Storage> Checker<'_, S> {
    /// Checks entries, references and the reverse index, and repairs them when asked.
    pub(super) fn check_references(
        &mut self,
        ns: &Namespace,
        chunks: &ChunkScan,
    ) -> Result<References, CheckError> {
        let lineages = Lineages::new(ns.view());
        let scan = scan(ns, &lineages, &|hash| chunks.damaged.contains_key(hash))?;
        self.report.totals.manifest_entries = scan.entries;
        for (hash, &entries) in &scan.dangling {
            let problem = Problem::new(
                Severity::Corruption,
                format!("chunk {hash}"),
                format!(
                    "named by {}, but the index has no such chunk",
                    counted(entries, "manifest entry")
                ),
            )
            .affecting(scan.readers.get(hash).into_iter().flatten().cloned())
            .with(self.cannot_fix(
                "no copy of the chunk is known; the blocks that name it read as errors (EIO)",
            ));
            self.push(problem);
        }
        let needs_repair = !scan.strays.is_empty()
            || !scan.reverse_missing.is_empty()
            || !scan.reverse_extra.is_empty()
            || !scan.miscounted.is_empty();
        let repaired = match self.repair && needs_repair {
            true => Some(repair(ns, &lineages, &scan).map_err(|e| e.to_string())),
            false => None,
        };
        let outcome = |done: String| -> Option<Outcome> {
            repaired.as_ref().map(|r| match r {
                Ok(_) => Outcome::Repaired(done),
                Err(e) => Outcome::Failed(e.clone()),
            })
        };
        self.report_strays(&scan, &lineages, &outcome);
        if !scan.reverse_missing.is_empty() || !scan.reverse_extra.is_empty() {
            let (missing, extra) = (scan.reverse_missing.len(), scan.reverse_extra.len());
            self.push(
                Problem::new(
                    Severity::Leak,
                    "index snapshot_blocks",
                    format!(
                        "{} missing (deleting their snapshots would leave those entries and \
                         their references behind), {} naming no entry",
                        counted(missing as u64, "row"),
                        counted(extra as u64, "row")
                    ),
                )
                .with(outcome(format!(
                    "{} added, {} removed",
                    counted(missing as u64, "row"),
                    counted(extra as u64, "row")
                ))),
            );
        }
        let changed: HashMap<ChunkHash, u64> = match &repaired {
            Some(Ok(changed)) => changed.iter().map(|&(h, _, new)| (h, new)).collect(),
            _ => HashMap::new(),
        };
        self.report_miscounted(&scan, &changed, &outcome);
        Ok(References {
            readers: scan.readers,
        })
    }

    /// Reports reference counts that differ from their entries; `changed` holds the
    /// counts a repair set.
    fn report_miscounted(
        &mut self,
        scan: &Scan,
        changed: &HashMap<ChunkHash, u64>,
        outcome: &dyn Fn(String) -> Option<Outcome>,
    ) {
        for &(hash, refs, entries) in &scan.miscounted {
            let recorded = counted(refs, "reference");
            let naming = counted(entries, "manifest entry");
            let (severity, detail) = if refs < entries {
                (
                    Severity::Corruption,
                    format!(
                        "{recorded} recorded but named by {naming}: deleting snapshots would \
                         free it while others still read it"
                    ),
                )
            } else if entries == 0 {
                (
                    Severity::Leak,
                    format!("{recorded} recorded but no manifest entry names it"),
                )
            } else {
                (
                    Severity::Leak,
                    format!("{recorded} recorded but named by only {naming}"),
                )
            };
            let done = match changed.get(&hash) {
                Some(0) => "row removed: nothing names it (its space is freed below)".to_string(),
                Some(new) => format!("reference count set to {new}"),
                None => "matches its entries once those of missing snapshots are gone".to_string(),
            };
            self.push(Problem::new(severity, format!("chunk {hash}"), detail).with(outcome(done)));
        }
    }

    fn report_strays(
        &mut self,
        scan: &Scan,
        lineages: &Lineages,
        outcome: &dyn Fn(String) -> Option<Outcome>,
    ) {
        let mut by_snapshot: BTreeMap<(u64, u64), Vec<&Stray>> = BTreeMap::new();
        for stray in &scan.strays {
            by_snapshot
                .entry((stray.lineage, stray.snapshot))
                .or_default()
                .push(stray);
        }
        for ((lineage, snapshot), strays) in by_snapshot {
            let readers: BTreeSet<u64> = strays.iter().filter_map(|s| s.reader).collect();
            let moved = strays.iter().filter(|s| s.reader.is_some()).count();
            let reader_names: Vec<String> =
                readers.iter().map(|&id| lineages.shown_name(id)).collect();
            let whose = match lineages.lineage_of(snapshot) {
                Some(other) => format!("snapshot id {snapshot} belongs to lineage {other}"),
                None => format!("snapshot id {snapshot} does not exist"),
            };
            let mut detail = format!(
                "{} in lineage {lineage}, but {whose}",
                counted(strays.len() as u64, "manifest entry")
            );
            if moved > 0 {
                detail.push_str(&format!(
                    "; {moved} of them are what {} reads",
                    reader_names.join(", ")
                ));
            }
            let done = if moved > 0 {
                format!(
                    "{} moved to {}, {} removed (their references released)",
                    counted(moved as u64, "entry"),
                    reader_names.join(", "),
                    strays.len() - moved
                )
            } else {
                format!(
                    "{} removed (their references released)",
                    counted(strays.len() as u64, "entry")
                )
            };
            self.push(
                Problem::new(
                    Severity::Leak,
                    format!("entries of snapshot id {snapshot}"),
                    detail,
                )
                .with(outcome(done)),
            );
        }
    }
}

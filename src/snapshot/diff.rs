//! Changed blocks: the byte ranges in which a snapshot's image differs from its
//! parent's (`snapshots/<id>/changed`, and `ebsfs snapshot diff`).
//!
//! The work is proportional to the change, not to the volume: every block a snapshot
//! differs from its base in has an entry owned by that snapshot (the `snapshot_blocks`
//! index lists them), so the candidates are the blocks owned by the snapshots after
//! the parent up to this one (hidden ones not yet merged included). Each candidate is
//! then resolved in both images and kept only if the contents differ, so a block
//! changed and changed back between the two is not listed.

use std::collections::BTreeSet;
use std::ops::Range;

use crate::namespace::tables::MANIFEST;
use crate::namespace::{NamespaceError, SnapshotRecord};
use crate::storage::Storage;

use super::manifest;
use super::{SnapshotEngine, SnapshotError, SnapshotResult};

impl<S: Storage> SnapshotEngine<S> {
    /// Byte ranges of `record`'s image that differ from its parent's (the one `info`
    /// names: the newest older visible completed snapshot of its volume when it was
    /// captured, else the snapshot the volume was made from, else an image of zeros),
    /// in order and merged. Bytes past the
    /// parent's size count as changed.
    pub fn changed_ranges(&self, record: &SnapshotRecord) -> SnapshotResult<Vec<Range<u64>>> {
        if !record.is_captured() {
            return Err(SnapshotError::NotReady(record.name()));
        }
        let bs = u64::from(record.block_size);
        let size = record.size_bytes;
        let view = self.ns.view();
        // The parent `info` names, so that a walk along `parent` adds up.
        let parent = record
            .parent
            .as_deref()
            .and_then(|name| view.snapshot_id(name).or_else(|| view.binned_id(name)))
            .and_then(|id| view.snapshots.get(&id));
        let Some(parent) = parent.filter(|p| u64::from(p.block_size) == bs) else {
            // Against zeros: every block holding data.
            let runs = self.data_extents(record)?;
            return Ok(to_bytes(runs.into_iter(), bs, size));
        };
        let after = if parent.lineage == record.lineage {
            parent.id
        } else {
            crate::namespace::SnapshotId(0)
        };
        let txn = self.ns.read()?;
        let mut candidates = BTreeSet::new();
        for owner in view
            .lineage(record.lineage)
            .filter(|s| s.id > after && s.id <= record.id)
        {
            candidates.extend(manifest::committed_blocks(&txn, owner.id)?);
        }
        let table = txn.open_table(MANIFEST).map_err(NamespaceError::from)?;
        let ours = view.chain(record.lineage, record.id);
        let theirs = view.chain(parent.lineage, parent.id);
        let blocks = size.div_ceil(bs);
        let mut runs: Vec<Range<u64>> = Vec::new();
        for block in candidates.into_iter().take_while(|&b| b < blocks) {
            if manifest::resolve_chain(&table, &ours, block)?
                == manifest::resolve_chain(&table, &theirs, block)?
            {
                continue;
            }
            match runs.last_mut() {
                Some(run) if run.end == block => run.end += 1,
                _ => runs.push(block..block + 1),
            }
        }
        let mut ranges = to_bytes(runs.into_iter(), bs, size);
        if parent.size_bytes < size {
            push_merged(&mut ranges, parent.size_bytes..size);
        }
        Ok(ranges)
    }
}

/// Block runs as byte ranges, cut at `size`.
fn to_bytes(runs: impl Iterator<Item = Range<u64>>, bs: u64, size: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for run in runs {
        let range = run.start * bs..(run.end * bs).min(size);
        if !range.is_empty() {
            push_merged(&mut out, range);
        }
    }
    out
}

/// Appends `range` to sorted `ranges`, merging it with the ranges it overlaps or
/// touches.
pub fn push_merged(ranges: &mut Vec<Range<u64>>, range: Range<u64>) {
    let at = ranges.partition_point(|r| r.end < range.start);
    let mut merged = range;
    while let Some(r) = ranges.get(at).filter(|r| r.start <= merged.end) {
        merged = merged.start.min(r.start)..merged.end.max(r.end);
        ranges.remove(at);
    }
    ranges.insert(at, merged);
}

/// The text of a `changed` file: one `OFFSET LENGTH` line (bytes) per range.
pub fn render_ranges(ranges: &[Range<u64>]) -> String {
    ranges
        .iter()
        .map(|r| format!("{} {}\n", r.start, r.end - r.start))
        .collect()
}

/// Parses the text [`render_ranges`] writes.
pub fn parse_ranges(text: &str) -> Result<Vec<Range<u64>>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut parts = line.split_whitespace().map(str::parse::<u64>);
            match (parts.next(), parts.next(), parts.next()) {
                (Some(Ok(offset)), Some(Ok(length)), None) => Ok(offset..offset + length),
                _ => Err(format!("not an `OFFSET LENGTH` line: {line:?}")),
            }
        })
        .collect()
}

/// The byte ranges in which snapshot `to` differs from `from`, an earlier snapshot in
/// its line of parents (`ebsfs snapshot diff`): the union of the `changed` ranges of
/// every snapshot from `to` back to the one whose parent is `from`, cut at `to`'s size.
/// A block changed and changed back in between is listed. `changed(name)` gives a
/// snapshot's ranges; `parent(name)` its parent's name and its own size.
pub fn diff_along_parents(
    from: &str,
    to: &str,
    mut changed: impl FnMut(&str) -> Result<Vec<Range<u64>>, String>,
    mut parent: impl FnMut(&str) -> Result<(Option<String>, u64), String>,
) -> Result<Vec<Range<u64>>, String> {
    let (_, size) = parent(to)?;
    let mut ranges = Vec::new();
    let mut at = to.to_string();
    while at != from {
        for range in changed(&at)? {
            let range = range.start..range.end.min(size);
            if !range.is_empty() {
                push_merged(&mut ranges, range);
            }
        }
        at = match parent(&at)?.0 {
            Some(p) => p,
            None => {
                return Err(format!(
                    "{from} is not an earlier snapshot of {to} (follow `parent` in `info`: \
                     {to} descends from no snapshot named {from})"
                ));
            }
        };
    }
    Ok(ranges)
}

/// Ranges as JSON: `[{"offset": …, "length": …}, …]`.
pub fn ranges_json(ranges: &[Range<u64>]) -> String {
    let items: Vec<String> = ranges
        .iter()
        .map(|r| {
            format!(
                "{{\"offset\": {}, \"length\": {}}}",
                r.start,
                r.end - r.start
            )
        })
        .collect();
    format!("[{}]\n", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_joins_touching_and_overlapping_ranges_in_any_order() {
        let mut ranges = Vec::new();
        for r in [10..20, 30..40, 20..25, 0..5, 38..50, 5..6, 60..61] {
            push_merged(&mut ranges, r);
        }
        assert_eq!(ranges, vec![0..6, 10..25, 30..50, 60..61]);
        push_merged(&mut ranges, 0..100);
        assert_eq!(ranges, vec![0..100]);
    }

    #[test]
    fn rendered_ranges_parse_back() {
        let ranges = vec![0..65536, 131072..131172];
        let text = render_ranges(&ranges);
        assert_eq!(text, "0 65536\n131072 100\n");
        assert_eq!(parse_ranges(&text).unwrap(), ranges);
        assert!(parse_ranges("1 2 3\n").is_err());
        assert!(parse_ranges("x 2\n").is_err());
        assert_eq!(
            ranges_json(&ranges),
            "[{\"offset\": 0, \"length\": 65536}, {\"offset\": 131072, \"length\": 100}]\n"
        );
        assert_eq!(ranges_json(&[]), "[]\n");
    }
}

//! Changed blocks (`snapshots/<id>/changed` and `ebsfs snapshot diff`) against a model,
//! in-process: random writes between snapshots, some snapshots deleted, and for every
//! pair of snapshots left the listed ranges must be exactly the blocks written in
//! between (random data: a written block always differs), plus the bytes the volume
//! grew by.

mod core_support;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::ops::Range;

use core_support::{CoreOps, pattern, root, settings, start};
use ebsfs::fs::FsCore;
use ebsfs::fs::inode::SNAPSHOTS_DIR;
use ebsfs::snapshot::diff::{diff_along_parents, parse_ranges, push_merged};
use ebsfs::storage::memory::MemStorage;

const BLOCK: u64 = 16 << 10;
const SPAN_BLOCKS: u64 = 48;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

struct Snap {
    name: String,
    size: u64,
    /// Blocks written between the previous snapshot taken and this one.
    written: BTreeSet<u64>,
    deleted: bool,
}

fn changed_of(core: &FsCore<MemStorage>, name: &str) -> Result<Vec<Range<u64>>, String> {
    let ino = core
        .snapshot_file(name, "changed")
        .ok_or_else(|| format!("{name} has no changed file"))?;
    let text = core.read_file(ino).map_err(|e| e.to_string())?;
    parse_ranges(&String::from_utf8_lossy(&text))
}

fn parent_of(core: &FsCore<MemStorage>, name: &str) -> Result<(Option<String>, u64), String> {
    let info = core.info(name);
    let parent = info
        .get("parent")
        .and_then(|p| p.as_str())
        .map(str::to_string);
    let size = info.get("size").and_then(|s| s.as_integer()).expect("size") as u64;
    Ok((parent, size))
}

/// The byte ranges `blocks` cover, cut at `size`, plus `grown` (bytes past the
/// older image's end).
fn expected(blocks: &BTreeSet<u64>, size: u64, grown: Range<u64>) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for &b in blocks {
        let range = b * BLOCK..((b + 1) * BLOCK).min(size);
        if !range.is_empty() {
            push_merged(&mut out, range);
        }
    }
    if !grown.is_empty() {
        push_merged(&mut out, grown);
    }
    out
}

#[test]
fn changed_and_diff_list_exactly_the_blocks_written_between_two_snapshots() {
    for seed in 1..=30u64 {
        let storage = MemStorage::new();
        let core = start(&storage, &settings()).expect("start");
        core.new_volume("a").expect("create");
        let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
        let mut size = 0u64;
        let mut snaps: Vec<Snap> = Vec::new();
        for round in 0..8 {
            let mut written = BTreeSet::new();
            for w in 0..1 + rng.below(4) {
                let offset = rng.below(SPAN_BLOCKS * BLOCK);
                let len = 1 + rng.below(3 * BLOCK);
                let data = pattern(len as usize, seed * 1000 + round * 10 + w + 1);
                core.write_volume("a", offset, &data).expect("write");
                written.extend(offset / BLOCK..(offset + len).div_ceil(BLOCK));
                size = size.max(offset + len);
            }
            let name = format!("a@s{round}");
            core.snapshot_now(&name);
            snaps.push(Snap {
                name,
                size,
                written,
                deleted: false,
            });
            // Now and then a snapshot in the middle goes.
            if round >= 2 && rng.below(3) == 0 {
                let alive: Vec<usize> = (1..snaps.len() - 1)
                    .filter(|&i| !snaps[i].deleted)
                    .collect();
                if !alive.is_empty() {
                    let i = alive[rng.below(alive.len() as u64) as usize];
                    core.rmdir(SNAPSHOTS_DIR, OsStr::new(&snaps[i].name), &root())
                        .expect("rmdir");
                    snaps[i].deleted = true;
                }
            }
        }
        core.engine().run_queued();
        let alive: Vec<usize> = (0..snaps.len()).filter(|&i| !snaps[i].deleted).collect();
        // The first snapshot: against zeros, every block holding data.
        let first = &snaps[alive[0]];
        let mut holding: BTreeSet<u64> = BTreeSet::new();
        for s in &snaps[..=alive[0]] {
            holding.extend(&s.written);
        }
        assert_eq!(
            changed_of(&core, &first.name).expect("changed"),
            expected(&holding, first.size, 0..0),
            "seed {seed}: changed of {}",
            first.name
        );
        for (x, &i) in alive.iter().enumerate() {
            for &j in &alive[x + 1..] {
                let (from, to) = (&snaps[i], &snaps[j]);
                let mut written = BTreeSet::new();
                for s in &snaps[i + 1..=j] {
                    written.extend(&s.written);
                }
                let got = diff_along_parents(
                    &from.name,
                    &to.name,
                    |n| changed_of(&core, n),
                    |n| parent_of(&core, n),
                )
                .unwrap_or_else(|e| panic!("seed {seed}: diff {} {}: {e}", from.name, to.name));
                assert_eq!(
                    got,
                    expected(&written, to.size, from.size..to.size),
                    "seed {seed}: diff {} {}",
                    from.name,
                    to.name
                );
            }
        }
        // Not an ancestor: a clear error.
        let last = &snaps[*alive.last().expect("snapshots")];
        let err = diff_along_parents(
            &last.name,
            &first.name,
            |n| changed_of(&core, n),
            |n| parent_of(&core, n),
        )
        .expect_err("diff from a newer snapshot");
        assert!(err.contains("is not an earlier snapshot"), "{err}");
    }
}

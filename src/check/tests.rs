//! The check on data directories made by the real core in memory, then damaged.

use std::ffi::OsStr;
use std::path::PathBuf;

use super::*;
use crate::config::Settings;
use crate::fs::{Caller, FsCore, inode};
use crate::layout::VolumeFile;
use redb::ReadableTable;

use crate::namespace::tables::{CHUNKS, MANIFEST, SNAPSHOT_BLOCKS};
use crate::namespace::{NsResult, SnapshotId, VolumeId};
use crate::snapshot::Scheduling;
use crate::snapshot::manifest::{self, BlockContent};
use crate::storage::memory::MemStorage;
use crate::storage::{OpenOptions, StorageFile};
use crate::store::codec::ChunkHash;
use crate::store::index::{self, ChunkLocation};

const DATA: &str = "/data";
const BLOCK: usize = 64 << 10;
const BLOCKS: usize = 8;
const VOLUME: VolumeId = VolumeId(1);

fn layout() -> Layout {
    Layout::new(DATA)
}

fn settings() -> Settings {
    let mut settings = Settings::embedded();
    settings.data_dir = PathBuf::from(DATA);
    settings
}

fn root() -> Caller {
    Caller::with_groups(0, 0, vec![0])
}

/// Bytes that do not compress, so chunks are stored raw.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The volume `db` as the snapshots see it: `db@one` all blocks, `db@two` with blocks
/// 2 and 3 rewritten.
fn image_one() -> Vec<u8> {
    pattern(BLOCKS * BLOCK, 1)
}

fn image_two() -> Vec<u8> {
    let mut image = image_one();
    image[2 * BLOCK..4 * BLOCK].copy_from_slice(&pattern(2 * BLOCK, 2));
    image
}

fn start(storage: &MemStorage) -> FsCore<MemStorage> {
    FsCore::start(settings(), storage.clone(), Scheduling::Manual).expect("the directory mounts")
}

fn snapshot(core: &FsCore<MemStorage>, name: &str) {
    core.mkdir(inode::SNAPSHOTS_DIR, OsStr::new(name), &root())
        .unwrap();
    core.engine().run_queued();
}

/// A stopped data directory: volume `db` (id 1) with snapshots `db@one` (id 1) and
/// `db@two` (id 2).
fn build() -> MemStorage {
    let storage = MemStorage::new();
    let core = start(&storage);
    let ino = core
        .create_volume(
            inode::VOLUMES_DIR,
            OsStr::new("db.img"),
            0o644,
            &root(),
            true,
        )
        .unwrap()
        .ino;
    let (fh, _) = core.open(ino, true).unwrap();
    core.write(ino, fh, 0, &image_one()).unwrap();
    snapshot(&core, "db@one");
    core.write(
        ino,
        fh,
        2 * BLOCK as u64,
        &image_two()[2 * BLOCK..4 * BLOCK],
    )
    .unwrap();
    snapshot(&core, "db@two");
    core.release(fh);
    core.shutdown();
    storage
}

fn check(storage: &MemStorage, repair: bool) -> Report {
    check_data_dir(storage, &layout(), repair).expect("the check runs")
}

/// Checks, repairs, and checks again: returns both reports.
fn repair_and_recheck(storage: &MemStorage) -> (Report, Report) {
    let repaired = check(storage, true);
    (repaired, check(storage, false))
}

fn with_ns<T>(storage: &MemStorage, f: impl FnOnce(&Namespace) -> T) -> T {
    let ns = Namespace::open(storage, &layout().database(), false).unwrap();
    f(&ns)
}

/// The chunk block `block` of snapshot `snapshot` of `db` reads.
fn chunk_of(storage: &MemStorage, block: u64, snapshot: u64) -> (ChunkHash, ChunkLocation) {
    with_ns(storage, |ns| {
        let txn = ns.read().unwrap();
        let content = manifest::resolve(
            &txn.open_table(MANIFEST).unwrap(),
            VOLUME,
            block,
            SnapshotId(snapshot),
        )
        .unwrap();
        let BlockContent::Chunk(hash) = content else {
            panic!("block {block} is zero");
        };
        let (loc, _) = index::lookup(&txn.open_table(CHUNKS).unwrap(), &hash)
            .unwrap()
            .unwrap();
        (hash, loc)
    })
}

fn pack_file(storage: &MemStorage, id: u32) -> <MemStorage as Storage>::File {
    storage
        .open(&layout().pack(id), OpenOptions::EXISTING)
        .unwrap()
}

fn read_image(core: &FsCore<MemStorage>, name: &str) -> Vec<u8> {
    let dir = core
        .lookup(inode::SNAPSHOTS_DIR, OsStr::new(name))
        .unwrap()
        .ino;
    let ino = core.lookup(dir, OsStr::new("volume.img")).unwrap().ino;
    let (fh, _) = core.open(ino, false).unwrap();
    let mut image = vec![0u8; BLOCKS * BLOCK];
    let n = core.read(ino, fh, 0, &mut image).unwrap();
    core.release(fh);
    assert_eq!(n, image.len());
    image
}

fn severities(report: &Report) -> Vec<Severity> {
    report.problems.iter().map(|p| p.severity).collect()
}

#[test]
fn a_healthy_directory_is_clean_and_repair_changes_nothing() {
    let storage = build();
    let report = check(&storage, false);
    assert_eq!(report.exit_code(), EXIT_CLEAN, "{report}");
    let t = &report.totals;
    assert_eq!((t.volumes, t.snapshots, t.packs), (1, 2, 1), "{report}");
    assert_eq!(t.chunks, BLOCKS as u64 + 2, "{report}");
    assert_eq!(t.plain_bytes, (BLOCKS + 2) as u64 * BLOCK as u64);
    assert_eq!(t.manifest_entries, BLOCKS as u64 + 2);
    let report = check(&storage, true);
    assert!(report.problems.is_empty(), "{report}");
    assert!(report.to_string().contains("no problems found"), "{report}");
}

#[test]
fn a_running_daemon_makes_the_check_refuse() {
    let storage = build();
    let core = start(&storage);
    let err = check_data_dir(&storage, &layout(), false).unwrap_err();
    assert!(matches!(err, CheckError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("ebsfs scrub"), "{err}");
    drop(core);
    check(&storage, false);
}

#[test]
fn a_flipped_chunk_byte_is_corruption_naming_the_snapshots_that_read_it() {
    let storage = build();
    // Block 0 is read by both snapshots; block 2 of db@one by db@one alone.
    for (block, readers) in [(0, vec!["db@one", "db@two"]), (2, vec!["db@one"])] {
        let (hash, loc) = chunk_of(&storage, block, 1);
        let pack = pack_file(&storage, loc.pack);
        let mut byte = [0u8];
        pack.read_at(&mut byte, loc.offset + 100).unwrap();
        pack.write_all_at(&[byte[0] ^ 1], loc.offset + 100).unwrap();
        let report = check(&storage, false);
        assert_eq!(report.exit_code(), EXIT_CORRUPTION, "{report}");
        let problem = report
            .problems
            .iter()
            .find(|p| p.subject.contains(&hash.to_string()))
            .unwrap_or_else(|| panic!("{report}"));
        assert_eq!(problem.affects, readers, "{report}");
        pack.write_all_at(&byte, loc.offset + 100).unwrap();
    }
    let (_, loc) = chunk_of(&storage, 0, 1);
    pack_file(&storage, loc.pack)
        .write_all_at(b"damage", loc.offset)
        .unwrap();
    let (repaired, again) = repair_and_recheck(&storage);
    assert_eq!(repaired.exit_code(), EXIT_CORRUPTION, "{repaired}");
    assert!(matches!(
        repaired.problems[0].outcome,
        Some(Outcome::NotRepaired(_))
    ));
    assert_eq!(severities(&again), [Severity::Corruption], "{again}");
    // It mounts; the damaged block reads as EIO, the others read back.
    let core = start(&storage);
    let dir = core
        .lookup(inode::SNAPSHOTS_DIR, OsStr::new("db@one"))
        .unwrap()
        .ino;
    let ino = core.lookup(dir, OsStr::new("volume.img")).unwrap().ino;
    let (fh, _) = core.open(ino, false).unwrap();
    let mut block = vec![0u8; BLOCK];
    let err = core.read(ino, fh, 0, &mut block).unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    core.read(ino, fh, 4 * BLOCK as u64, &mut block).unwrap();
    assert!(block == image_one()[4 * BLOCK..5 * BLOCK]);
}

#[test]
fn a_missing_or_truncated_pack_is_corruption() {
    let storage = build();
    let (_, loc) = chunk_of(&storage, 5, 2);
    let path = layout().pack(loc.pack);
    pack_file(&storage, loc.pack).set_len(loc.offset).unwrap();
    let report = check(&storage, false);
    assert_eq!(report.exit_code(), EXIT_CORRUPTION, "{report}");
    let problem = &report.problems[0];
    assert!(problem.detail.contains("were committed"), "{report}");
    assert_eq!(problem.affects, ["db@one", "db@two"], "{report}");
    storage.remove_file(&path).unwrap();
    let (repaired, again) = repair_and_recheck(&storage);
    assert!(
        repaired.problems[0].detail.contains("missing"),
        "{repaired}"
    );
    assert_eq!(repaired.exit_code(), EXIT_CORRUPTION, "{repaired}");
    assert_eq!(again.exit_code(), EXIT_CORRUPTION, "{again}");
    drop(start(&storage));
}

/// Sets a row's reference count as it is, zero included.
fn set_refs(storage: &MemStorage, hash: ChunkHash, refs: u64) {
    with_ns(storage, |ns| {
        ns.change_data(|d| -> NsResult<()> {
            let mut chunks = d.txn().open_table(CHUNKS)?;
            let mut row = chunks.get(&hash.0)?.unwrap().value();
            row.5 = refs;
            chunks.insert(&hash.0, row)?;
            Ok(())
        })
        .unwrap()
    });
}

#[test]
fn reference_counts_above_are_leaks_below_corruption_and_repair_sets_both() {
    let storage = build();
    let (above, _) = chunk_of(&storage, 0, 1);
    let (below, _) = chunk_of(&storage, 2, 2);
    set_refs(&storage, above, 5);
    let report = check(&storage, false);
    assert_eq!(report.exit_code(), EXIT_LEAKS, "{report}");
    set_refs(&storage, below, 0);
    let report = check(&storage, false);
    assert_eq!(report.exit_code(), EXIT_CORRUPTION, "{report}");
    let (repaired, again) = repair_and_recheck(&storage);
    assert_eq!(repaired.exit_code(), EXIT_CLEAN, "{repaired}");
    assert_eq!(again.exit_code(), EXIT_CLEAN, "{again}");
    with_ns(&storage, |ns| {
        let txn = ns.read().unwrap();
        let chunks = txn.open_table(CHUNKS).unwrap();
        assert_eq!(index::lookup(&chunks, &above).unwrap().unwrap().1, 1);
        assert_eq!(index::lookup(&chunks, &below).unwrap().unwrap().1, 1);
    });
}

#[test]
fn entries_of_a_missing_snapshot_move_to_the_snapshot_that_reads_them() {
    let storage = build();
    let (overridden, _) = chunk_of(&storage, 2, 1);
    // db@one's record goes as if its deletion had skipped the merge into db@two.
    with_ns(&storage, |ns| {
        let guard = ns.lock();
        ns.change(&guard, |c| c.remove_snapshot(SnapshotId(1)))
            .unwrap();
    });
    let report = check(&storage, false);
    assert_eq!(report.exit_code(), EXIT_LEAKS, "{report}");
    let stray = &report.problems[0];
    assert!(stray.detail.contains("8 manifest entries"), "{report}");
    assert!(
        stray.detail.contains("6 of them are what db@two reads"),
        "{report}"
    );
    let (repaired, again) = repair_and_recheck(&storage);
    assert_eq!(repaired.exit_code(), EXIT_CLEAN, "{repaired}");
    assert_eq!(again.exit_code(), EXIT_CLEAN, "{again}");
    assert_eq!(again.totals.manifest_entries, BLOCKS as u64, "{again}");
    assert_eq!(again.totals.chunks, BLOCKS as u64, "{again}");
    with_ns(&storage, |ns| {
        let txn = ns.read().unwrap();
        let chunks = txn.open_table(CHUNKS).unwrap();
        assert!(index::lookup(&chunks, &overridden).unwrap().is_none());
    });
    let core = start(&storage);
    assert!(read_image(&core, "db@two") == image_two());
}

#[test]
fn a_dangling_reference_stays_corruption_and_the_directory_still_mounts() {
    let storage = build();
    let (hash, _) = chunk_of(&storage, 0, 1);
    with_ns(&storage, |ns| {
        ns.change_data(|d| -> NsResult<()> {
            d.txn().open_table(CHUNKS)?.remove(&hash.0)?;
            Ok(())
        })
        .unwrap()
    });
    let report = check(&storage, false);
    assert_eq!(
        severities(&report),
        [Severity::Corruption, Severity::Leak],
        "{report}"
    );
    let dangling = &report.problems[0];
    assert!(dangling.detail.contains("no such chunk"), "{report}");
    assert_eq!(dangling.affects, ["db@one", "db@two"], "{report}");
    // Its payload is now space no row covers.
    assert!(report.problems[1].subject.starts_with("pack"), "{report}");
    let (repaired, again) = repair_and_recheck(&storage);
    assert_eq!(repaired.exit_code(), EXIT_CORRUPTION, "{repaired}");
    assert_eq!(severities(&again), [Severity::Corruption], "{again}");
    let core = start(&storage);
    core.rmdir(inode::SNAPSHOTS_DIR, OsStr::new("db@one"), &root())
        .expect("a snapshot naming a lost chunk can be deleted");
    core.shutdown();
    drop(core);
    let report = check(&storage, false);
    assert_eq!(report.problems[0].affects, ["db@two"], "{report}");
}

#[test]
fn pack_space_no_row_covers_is_a_leak_and_is_given_back() {
    let storage = build();
    let (_, loc) = chunk_of(&storage, 0, 1);
    let pack = pack_file(&storage, loc.pack);
    let committed = pack.len().unwrap();
    // A capture that never committed: a chunk past the committed length.
    pack.write_all_at(&pattern(BLOCK, 9), committed).unwrap();
    let report = check(&storage, false);
    assert_eq!(report.exit_code(), EXIT_LEAKS, "{report}");
    assert!(
        report.problems[0]
            .detail
            .contains("past its committed length"),
        "{report}"
    );
    // A deletion whose commit a crash separated from the punch: committed, no row.
    with_ns(&storage, |ns| {
        ns.change_data(|d| d.set_pack_len(loc.pack, committed + BLOCK as u64))
    })
    .unwrap();
    let report = check(&storage, false);
    assert_eq!(severities(&report), [Severity::Leak], "{report}");
    assert!(
        report.problems[0].detail.contains("hold no chunk"),
        "{report}"
    );
    let allocated = pack.allocated_bytes().unwrap();
    let (repaired, again) = repair_and_recheck(&storage);
    assert_eq!(repaired.exit_code(), EXIT_CLEAN, "{repaired}");
    assert_eq!(again.exit_code(), EXIT_CLEAN, "{again}");
    assert_eq!(pack.allocated_bytes().unwrap(), allocated - BLOCK as u64);
    let core = start(&storage);
    assert!(read_image(&core, "db@two") == image_two());
}

#[test]
fn a_tail_already_punched_is_only_a_note() {
    // What a cancelled capture leaves after a clean stop: its chunks were freed, the
    // file length stays until the next mount.
    let storage = build();
    let (_, loc) = chunk_of(&storage, 0, 1);
    let pack = pack_file(&storage, loc.pack);
    let committed = pack.len().unwrap();
    pack.write_all_at(&pattern(BLOCK, 9), committed).unwrap();
    pack.allocate(crate::storage::Allocate::PunchHole, committed, BLOCK as u64)
        .unwrap();
    let report = check(&storage, false);
    assert_eq!(report.exit_code(), EXIT_CLEAN, "{report}");
    assert!(report.notes[0].contains("all holes"), "{report}");
}

#[test]
fn orphan_files_are_leaks_and_go_to_lost_found() {
    let storage = build();
    let layout = layout();
    let orphans = [
        layout.volume_file(VolumeId(99), VolumeFile::Data),
        layout.volumes_dir().join("notes.txt"),
        layout.captures_dir().join("1-1.cow"),
        layout.pack(77),
    ];
    for (i, path) in orphans.iter().enumerate() {
        let file = storage.open(path, OpenOptions::CREATE).unwrap();
        file.write_all_at(&[i as u8; 10], 0).unwrap();
    }
    let report = check(&storage, false);
    assert_eq!(report.exit_code(), EXIT_LEAKS, "{report}");
    assert_eq!(report.problems.len(), orphans.len(), "{report}");
    let (repaired, again) = repair_and_recheck(&storage);
    assert_eq!(repaired.exit_code(), EXIT_CLEAN, "{repaired}");
    assert_eq!(again.exit_code(), EXIT_CLEAN, "{again}");
    let found = storage.list_dir(&layout.lost_found_dir()).unwrap();
    assert_eq!(found.len(), orphans.len(), "{found:?}");
    for path in &orphans {
        assert_eq!(storage.file_len(path).unwrap(), None);
    }
    assert_eq!(
        storage.contents(&layout.lost_found_dir().join("chunks_pack-00000077.dat")),
        Some(vec![3u8; 10])
    );
    drop(start(&storage));
}

#[test]
fn a_damaged_or_missing_dirty_map_is_replaced_and_the_volume_compares_every_block() {
    let storage = build();
    let layout = layout();
    let dirty = layout.volume_file(VOLUME, VolumeFile::Dirty);
    crate::storage::publish_file(&storage, &dirty, b"not a dirty map").unwrap();
    let report = check(&storage, false);
    assert_eq!(report.exit_code(), EXIT_CORRUPTION, "{report}");
    let (repaired, again) = repair_and_recheck(&storage);
    assert_eq!(repaired.exit_code(), EXIT_CLEAN, "{repaired}");
    assert_eq!(again.exit_code(), EXIT_CLEAN, "{again}");
    assert_eq!(
        storage.contents(&layout.lost_found_dir().join("volumes_1.dirty")),
        Some(b"not a dirty map".to_vec())
    );
    with_ns(&storage, |ns| {
        assert!(ns.view().volumes[&VOLUME].full_compare)
    });
    storage.remove_file(&dirty).unwrap();
    assert_eq!(check(&storage, false).exit_code(), EXIT_CORRUPTION);
    let (repaired, again) = repair_and_recheck(&storage);
    assert_eq!(
        (repaired.exit_code(), again.exit_code()),
        (EXIT_CLEAN, EXIT_CLEAN),
        "{repaired}"
    );
    // The next snapshot compares every block: it still holds the whole volume.
    let core = start(&storage);
    snapshot(&core, "db@three");
    assert!(read_image(&core, "db@three") == image_two());
}

#[test]
fn a_missing_data_file_stays_corruption_and_the_directory_still_mounts() {
    let storage = build();
    storage
        .remove_file(&layout().volume_file(VOLUME, VolumeFile::Data))
        .unwrap();
    let (repaired, again) = repair_and_recheck(&storage);
    assert_eq!(severities(&repaired), [Severity::Corruption], "{repaired}");
    assert!(matches!(
        repaired.problems[0].outcome,
        Some(Outcome::NotRepaired(_))
    ));
    assert_eq!(again.exit_code(), EXIT_CORRUPTION, "{again}");
    let core = start(&storage);
    assert!(read_image(&core, "db@two") == image_two());
}

#[test]
fn the_snapshot_blocks_index_is_matched_to_the_entries() {
    let storage = build();
    with_ns(&storage, |ns| {
        ns.change_data(|d| -> NsResult<()> {
            let mut reverse = d.txn().open_table(SNAPSHOT_BLOCKS)?;
            reverse.remove((1, 4))?;
            reverse.insert((2, 7), ())?;
            reverse.insert((40, 1), ())?;
            Ok(())
        })
        .unwrap()
    });
    let report = check(&storage, false);
    assert_eq!(severities(&report), [Severity::Leak], "{report}");
    assert!(
        report.problems[0].detail.starts_with("1 row missing"),
        "{report}"
    );
    assert!(
        report.problems[0].detail.contains("2 rows naming no entry"),
        "{report}"
    );
    let (repaired, again) = repair_and_recheck(&storage);
    assert_eq!(
        (repaired.exit_code(), again.exit_code()),
        (EXIT_CLEAN, EXIT_CLEAN),
        "{repaired}"
    );
}

#[test]
fn a_lost_database_is_rebuilt_with_the_volumes_it_had() {
    for damage in [&b""[..], b"this is not a database"] {
        let storage = build();
        let layout = layout();
        crate::storage::publish_file(&storage, &layout.database(), damage).unwrap();
        let report = check(&storage, false);
        assert_eq!(
            severities(&report),
            [Severity::Corruption, Severity::Corruption],
            "{report}"
        );
        let (repaired, again) = repair_and_recheck(&storage);
        assert_eq!(repaired.exit_code(), EXIT_CORRUPTION, "{repaired}");
        assert!(
            matches!(&repaired.problems[0].outcome, Some(Outcome::Repaired(done)) if done.contains("recovered-1")),
            "{repaired}"
        );
        assert_eq!(again.exit_code(), EXIT_CLEAN, "{again}");
        let found = storage.list_dir(&layout.lost_found_dir()).unwrap();
        assert!(found.contains(&"ebsfs.redb".into()), "{found:?}");
        assert!(
            found.contains(&"chunks_pack-00000001.dat".into()),
            "{found:?}"
        );
        let core = start(&storage);
        let attr = core
            .lookup(inode::VOLUMES_DIR, OsStr::new("recovered-1.img"))
            .unwrap();
        assert_eq!((attr.uid, attr.perm), (0, 0o600));
        let (fh, _) = core.open(attr.ino, false).unwrap();
        let mut data = vec![0u8; BLOCKS * BLOCK];
        core.read(attr.ino, fh, 0, &mut data).unwrap();
        assert!(data == image_two());
        // New volumes never reuse a recovered id.
        let new = core
            .create_volume(
                inode::VOLUMES_DIR,
                OsStr::new("new.img"),
                0o644,
                &root(),
                true,
            )
            .unwrap();
        assert_ne!(new.ino, attr.ino);
    }
}

#[test]
fn a_record_that_does_not_decode_is_corruption_left_to_the_user() {
    let storage = build();
    with_ns(&storage, |ns| {
        ns.change_data(|d| -> NsResult<()> {
            d.txn()
                .open_table(crate::namespace::tables::SNAPSHOTS)?
                .insert(1, "not = [a record")?;
            Ok(())
        })
        .unwrap()
    });
    let report = check(&storage, true);
    assert_eq!(report.exit_code(), EXIT_CORRUPTION, "{report}");
    assert!(report.problems[0].detail.contains("snapshot 1"), "{report}");
    assert!(
        matches!(report.problems[0].outcome, Some(Outcome::NotRepaired(_))),
        "{report}"
    );
}

#[test]
fn a_missing_format_marker_is_written_back() {
    let storage = build();
    storage.remove_file(&layout().marker()).unwrap();
    assert!(start_fails(&storage));
    let report = check(&storage, false);
    assert_eq!(report.exit_code(), EXIT_CORRUPTION, "{report}");
    let (repaired, again) = repair_and_recheck(&storage);
    assert_eq!(
        (repaired.exit_code(), again.exit_code()),
        (EXIT_CLEAN, EXIT_CLEAN),
        "{repaired}"
    );
    drop(start(&storage));
}

fn start_fails(storage: &MemStorage) -> bool {
    FsCore::start(settings(), storage.clone(), Scheduling::Manual).is_err()
}

#[test]
fn an_empty_directory_is_clean() {
    let storage = MemStorage::new();
    storage.create_dir_all(std::path::Path::new(DATA)).unwrap();
    let report = check(&storage, true);
    assert_eq!(report.exit_code(), EXIT_CLEAN, "{report}");
    assert!(report.problems.is_empty());
}

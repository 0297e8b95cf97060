//! The trust faults, each reproduced in-process on in-memory storage (no root, no
//! FUSE): the same scenarios `tests/trust.rs` runs through a real mount, here in
//! milliseconds and with exact control over crashes and damage.

mod core_support;

use std::path::{Path, PathBuf};

use core_support::{CoreOps, DATA, pattern, settings, start};
use ebsfs::fs::FsError;
use ebsfs::layout::{Layout, VolumeFile};
use ebsfs::namespace::VolumeId;
use ebsfs::storage::memory::{CrashMode, MemStorage};
use ebsfs::storage::{OpenOptions, Storage, StorageFile, publish_file};

const BLOCK: usize = 16 << 10;

fn layout() -> Layout {
    Layout::new(DATA)
}

/// A data directory with volumes `a` and `b` (one block of data each) and a
/// completed snapshot of each, cleanly stopped.
fn populated() -> MemStorage {
    let storage = MemStorage::new();
    let core = start(&storage, &settings()).expect("start");
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        core.new_volume(name).expect("create");
        core.write_volume(name, 0, &pattern(BLOCK, i as u64 + 1))
            .expect("write");
        core.snapshot_now(&format!("{name}@s1"));
    }
    core.shutdown();
    drop(core);
    storage.restart(CrashMode::Process)
}

fn files_of(storage: &MemStorage) -> Vec<(PathBuf, Vec<u8>)> {
    let layout = layout();
    let mut out = Vec::new();
    for dir in [layout.volumes_dir(), layout.chunks_dir()] {
        for name in storage.list_dir(&dir).expect("list") {
            let path = dir.join(name);
            let bytes = storage.contents(&path).expect("file");
            out.push((path, bytes));
        }
    }
    out
}

fn errno_of<T>(result: Result<T, FsError>) -> i32 {
    match result {
        Ok(_) => 0,
        Err(e) => e.errno(),
    }
}

#[test]
fn a_missing_or_empty_database_stops_the_mount_and_loses_nothing() {
    for damage in ["empty", "missing", "no marker"] {
        let storage = populated();
        let before = files_of(&storage);
        let layout = layout();
        match damage {
            "empty" => publish_file(&storage, &layout.database(), b"").expect("empty it"),
            "missing" => storage.remove_file(&layout.database()).expect("remove"),
            _ => storage
                .remove_file(&layout.marker())
                .expect("remove marker"),
        }
        let err = start(&storage, &settings())
            .err()
            .unwrap_or_else(|| panic!("{damage} database: the data directory opened"));
        assert!(
            err.to_string().contains("ebsfs check"),
            "{damage}: the refusal names no way out: {err}"
        );
        assert_eq!(files_of(&storage), before, "{damage}: files changed");
    }
}

#[test]
fn a_newer_format_is_refused() {
    let storage = populated();
    publish_file(&storage, &layout().marker(), b"format = 99\n").expect("marker");
    let err = start(&storage, &settings()).err().expect("refused");
    assert!(err.to_string().contains("format 99"), "{err}");
}

#[test]
fn a_damaged_dirty_map_makes_only_its_own_volume_damaged() {
    for garbage in [&b""[..], b"not a dirty map at all"] {
        let storage = populated();
        let dirty = layout().volume_file(VolumeId(1), VolumeFile::Dirty);
        publish_file(&storage, &dirty, garbage).expect("damage");
        let core = start(&storage, &settings()).expect("the mount comes up");
        assert_eq!(errno_of(core.read_volume("a")), libc::EIO);
        assert_eq!(errno_of(core.snapshot("a@s2")), libc::EIO);
        assert_eq!(core.read_volume("b").expect("b"), pattern(BLOCK, 2));
        core.write_volume("b", 0, b"still writable")
            .expect("write b");
        core.snapshot_now("b@s2");
        assert_eq!(
            core.read_image("a@s1").expect("a's snapshot"),
            pattern(BLOCK, 1)
        );
        // Damage is never "repaired" by inventing an empty map.
        assert_eq!(storage.contents(&dirty).expect("kept"), garbage);
    }
}

#[test]
fn a_stray_damaged_capture_set_does_not_stop_the_start() {
    let storage = populated();
    let layout = layout();
    let stray = layout.captures_dir().join("9-99.set");
    publish_file(&storage, &stray, b"garbage").expect("stray");
    let core = start(&storage, &settings()).expect("start");
    assert_eq!(core.read_volume("a").expect("a"), pattern(BLOCK, 1));
    assert_eq!(storage.file_len(&stray).expect("stat"), None);
    let moved = storage
        .list_dir(&layout.lost_found_dir())
        .expect("lost+found");
    assert_eq!(moved, ["captures_9-99.set"]);
}

#[test]
fn missing_files_are_reported_never_recreated() {
    let storage = populated();
    let layout = layout();
    let data = layout.volume_file(VolumeId(1), VolumeFile::Data);
    storage.remove_file(&data).expect("remove a.raw");
    let pack = layout.pack(1);
    storage.remove_file(&pack).expect("remove the pack");
    let core = start(&storage, &settings()).expect("start");
    assert_eq!(errno_of(core.read_volume("a")), libc::EIO);
    assert_eq!(errno_of(core.read_image("b@s1")), libc::EIO);
    assert_eq!(core.read_volume("b").expect("b"), pattern(BLOCK, 2));
    assert_eq!(storage.file_len(&data).expect("stat"), None);
    assert_eq!(storage.file_len(&pack).expect("stat"), None);
}

#[test]
fn a_truncated_pack_fails_only_the_chunks_it_lost() {
    let storage = populated();
    let pack = layout().pack(1);
    // Two payloads (one per volume) after the 4 KiB header: cut into the second.
    let file = storage.open(&pack, OpenOptions::EXISTING).expect("pack");
    file.set_len(4096 + BLOCK as u64 + 100).expect("truncate");
    let core = start(&storage, &settings()).expect("start");
    assert_eq!(core.read_image("a@s1").expect("a@s1"), pattern(BLOCK, 1));
    assert_eq!(errno_of(core.read_image("b@s1")), libc::EIO);
}

#[test]
fn a_damaged_chunk_is_never_reused_and_a_fresh_copy_heals_it() {
    let storage = populated();
    let pack = layout().pack(1);
    let file = storage.open(&pack, OpenOptions::EXISTING).expect("pack");
    let mut byte = [0u8; 1];
    file.read_at(&mut byte, 4096 + 100).expect("read");
    file.write_all_at(&[byte[0] ^ 0xff], 4096 + 100)
        .expect("flip");
    let core = start(&storage, &settings()).expect("start");
    assert_eq!(errno_of(core.read_image("a@s1")), libc::EIO);
    // The same bytes again, in another block: dedup must not point at the bad copy.
    core.write_volume("a", BLOCK as u64, &pattern(BLOCK, 1))
        .expect("write");
    core.snapshot_now("a@s2");
    let mut expected = pattern(BLOCK, 1);
    expected.extend(pattern(BLOCK, 1));
    assert_eq!(core.read_image("a@s2").expect("a@s2"), expected);
    // The index now names the fresh copy: the older snapshot reads again.
    assert_eq!(
        core.read_image("a@s1").expect("a@s1 healed"),
        pattern(BLOCK, 1)
    );
}

#[test]
fn a_deleted_snapshot_stays_readable_through_open_handles() {
    let storage = populated();
    let core = start(&storage, &settings()).expect("start");
    let ino = core.snapshot_file("a@s1", "volume.img").expect("image");
    let (fh, _) = core.open(ino, false).expect("open");
    core.rmdir(
        ebsfs::fs::inode::SNAPSHOTS_DIR,
        std::ffi::OsStr::new("a@s1"),
        &core_support::root(),
    )
    .expect("rmdir");
    assert_eq!(core.status("a@s1"), None, "the name goes at once");
    // Nothing newer exists: a deleted base would be kept anyway; overwrite the block
    // and take a newer snapshot so that settling would merge it away if unpinned.
    core.write_volume("a", 0, &pattern(BLOCK, 9))
        .expect("write");
    core.snapshot_now("a@s2");
    assert_eq!(core.read_handle(ino, fh).expect("read"), pattern(BLOCK, 1));
    let pack = layout().pack(1);
    let allocated = |s: &MemStorage| {
        s.open(&pack, OpenOptions::EXISTING)
            .and_then(|f| f.allocated_bytes())
            .expect("pack")
    };
    let before = allocated(&storage);
    core.release(fh);
    assert!(
        allocated(&storage) < before,
        "the last close gave no space back"
    );
}

#[test]
fn after_a_host_crash_the_full_comparison_reads_only_data() {
    let storage = MemStorage::new();
    let mut settings = settings();
    settings.max_volume_size_bytes = 1 << 40;
    let core = start(&storage, &settings).expect("start");
    core.new_volume("big").expect("create");
    let ino = core.volume_ino("big").expect("ino");
    let grow = ebsfs::fs::SetAttr {
        size: Some(16 << 30),
        ..Default::default()
    };
    core.setattr(ino, grow, &core_support::root())
        .expect("16 GiB");
    for (i, offset) in [0u64, 5 << 30, (16 << 30) - BLOCK as u64]
        .into_iter()
        .enumerate()
    {
        core.write_volume("big", offset, &pattern(BLOCK, i as u64))
            .expect("write");
    }
    core.snapshot_now("big@s1");
    core.write_volume("big", 3 << 30, &pattern(BLOCK, 7))
        .expect("write");
    let (fh, _) = core.open(ino, true).expect("open");
    core.fsync(ino, fh, false).expect("fsync");
    core.release(fh);
    drop(core);
    // Power loss: the boot id changes, so the dirty map is not trusted.
    let storage = storage.restart(CrashMode::PowerLoss);
    let core = start(&storage, &settings).expect("restart");
    let read_before = storage.bytes_read();
    core.snapshot_now("big@s2");
    let read = storage.bytes_read() - read_before;
    assert!(
        read < 64 * BLOCK as u64,
        "the capture read {read} bytes of a 16 GiB volume holding 4 blocks"
    );
    assert_eq!(core.info("big@s2")["changed_blocks"].as_integer(), Some(1));
    let image = core.snapshot_file("big@s2", "volume.img").expect("image");
    let (fh, _) = core.open(image, false).expect("open");
    let mut block = vec![0u8; BLOCK];
    for (offset, expected) in [
        (0u64, pattern(BLOCK, 0)),
        (3 << 30, pattern(BLOCK, 7)),
        (5 << 30, pattern(BLOCK, 1)),
        (9 << 30, vec![0; BLOCK]),
    ] {
        core.read(image, fh, offset, &mut block).expect("read");
        assert_eq!(block, expected, "offset {offset}");
    }
    core.release(fh);
}

#[test]
fn every_crash_point_of_a_freeze_leaves_a_mountable_directory() {
    // Fault: a crash between moving the dirty map into captures/ and writing the
    // fresh map's header left a 0-byte map that no later start could open.
    let mut crash_at = 1;
    loop {
        let storage = populated();
        let core = start(&storage, &settings()).expect("start");
        core.write_volume("a", 0, &pattern(BLOCK, 5))
            .expect("write");
        storage.crash_after(crash_at);
        let created = core.snapshot("a@s2").is_ok();
        let crashed = storage.has_crashed();
        drop(core);
        let storage = storage.restart(CrashMode::Process);
        let core = start(&storage, &settings())
            .unwrap_or_else(|e| panic!("crash at operation {crash_at} of mkdir: {e}"));
        assert_eq!(core.read_volume("a").expect("a"), pattern(BLOCK, 5));
        // A snapshot whose record the crash left resumes its capture and completes.
        core.core().engine().run_queued();
        if let Some(status) = core.status("a@s2") {
            assert_eq!(
                status, "completed",
                "a@s2 after a crash at operation {crash_at}"
            );
            assert_eq!(core.read_image("a@s2").expect("a@s2"), pattern(BLOCK, 5));
        }
        core.snapshot_now("a@s3");
        assert_eq!(core.read_image("a@s3").expect("a@s3"), pattern(BLOCK, 5));
        if created && !crashed {
            break;
        }
        crash_at += 1;
    }
    assert!(crash_at > 5, "mkdir took only {crash_at} operations");
}

#[test]
fn unknown_files_go_to_lost_and_found() {
    let storage = populated();
    let layout = layout();
    let stray = layout.volumes_dir().join("77.raw");
    publish_file(&storage, &stray, b"someone's data").expect("stray");
    let abandoned = layout.volume_file(VolumeId(500), VolumeFile::Data);
    publish_file(&storage, &abandoned, b"").expect("abandoned create");
    drop(start(&storage, &settings()).expect("start"));
    assert_eq!(storage.file_len(&stray).expect("stat"), None);
    // An empty file of an id never committed is provably an abandoned creation.
    assert_eq!(storage.file_len(&abandoned).expect("stat"), None);
    let found = Path::new(&layout.lost_found_dir()).join("volumes_77.raw");
    assert_eq!(storage.contents(&found).expect("kept"), b"someone's data");
}

#[test]
fn a_capture_a_kill_interrupts_resumes_with_its_point_in_time() {
    // A crash at each storage operation of a capture, with blocks overwritten after
    // the freeze. After a kill the snapshot resumes and completes exactly as at its
    // mkdir; after a power loss (the preserved pages were never synced) it is `error`
    // with the reason, and the next snapshot still holds every change.
    for mode in [CrashMode::Process, CrashMode::PowerLoss] {
        let mut crash_at = 1;
        loop {
            let storage = populated();
            let core = start(&storage, &settings()).expect("start");
            let frozen = pattern(8 * BLOCK, 7);
            core.write_volume("a", 0, &frozen).expect("write");
            core.snapshot("a@s2").expect("mkdir a@s2");
            let later = pattern(3 * BLOCK + 100, 8);
            core.write_volume("a", BLOCK as u64 / 2, &later)
                .expect("write after the freeze");
            storage.crash_after(crash_at);
            core.core().engine().run_queued();
            let crashed = storage.has_crashed();
            drop(core);
            let storage = storage.restart(mode);
            let core = start(&storage, &settings())
                .unwrap_or_else(|e| panic!("start after a crash at {crash_at} ({mode:?}): {e}"));
            core.core().engine().run_queued();
            let status = core.status("a@s2");
            // A power loss after the completing commit leaves it completed.
            if crashed && mode == CrashMode::PowerLoss && status.as_deref() != Some("completed") {
                assert_eq!(status.as_deref(), Some("error"), "crash at {crash_at}");
                let info = core.info("a@s2");
                let reason = info.get("error").and_then(|e| e.as_str()).unwrap_or("");
                assert!(reason.contains("host crash"), "error reason: {reason:?}");
            } else {
                assert_eq!(
                    status.as_deref(),
                    Some("completed"),
                    "a@s2 after a kill at operation {crash_at} of its capture"
                );
                assert!(
                    core.read_image("a@s2").expect("a@s2") == frozen,
                    "a@s2 after a kill at operation {crash_at} is not its point in time"
                );
            }
            if mode == CrashMode::Process {
                let mut live = frozen.clone();
                live[BLOCK / 2..BLOCK / 2 + later.len()].copy_from_slice(&later);
                assert!(core.read_volume("a").expect("a") == live, "volume a");
            }
            core.snapshot_now("a@s3");
            assert!(
                core.read_image("a@s3").expect("a@s3") == core.read_volume("a").expect("a"),
                "the next snapshot after a crash at {crash_at} ({mode:?}) misses changes"
            );
            if !crashed {
                break;
            }
            crash_at += 1;
        }
        assert!(crash_at > 3, "the capture took only {crash_at} operations");
    }
}

//! The recycle bin (`recycle_bin` in config), in-process with a fake clock: a deleted
//! snapshot waits in `recycle-bin/` whole, comes back with `mv` byte for byte, keeps
//! its name taken, is purged when its period is over (or at once with `rmdir`) without
//! breaking the snapshots around it, and a crash at any point of the move leaves it in
//! one place or the other, whole.

mod core_support;

use std::ffi::OsStr;

use core_support::{CoreOps, pattern, root, settings, start};
use ebsfs::config::Settings;
use ebsfs::fs::inode::{RECYCLE_BIN, RECYCLE_BIN_DIR, ROOT, SNAPSHOTS_DIR};
use ebsfs::fs::{Caller, FsCore, FsResult, XattrFlags};
use ebsfs::namespace::Timestamp;
use ebsfs::storage::memory::{CrashMode, MemStorage};

const HOUR: u64 = 3600;
const BLOCK: usize = 16 << 10;

fn bin_settings() -> Settings {
    let mut s = settings();
    s.recycle_bin_secs = Some(HOUR);
    s
}

fn errno<T>(result: FsResult<T>) -> i32 {
    result.err().map_or(0, |e| e.errno())
}

fn rmdir(core: &FsCore<MemStorage>, snap: &str) -> FsResult<()> {
    core.rmdir(SNAPSHOTS_DIR, OsStr::new(snap), &root())
}

fn restore(core: &FsCore<MemStorage>, snap: &str, caller: &Caller) -> FsResult<()> {
    core.rename(
        RECYCLE_BIN_DIR,
        OsStr::new(snap),
        SNAPSHOTS_DIR,
        OsStr::new(snap),
        false,
        caller,
    )
}

/// Names in `recycle-bin/`.
fn binned(core: &FsCore<MemStorage>) -> Vec<String> {
    core.readdir(RECYCLE_BIN_DIR)
        .expect("readdir recycle-bin")
        .into_iter()
        .map(|e| e.name)
        .filter(|n| n != "." && n != "..")
        .collect()
}

/// A binned snapshot's image, read through `recycle-bin/<name>/volume.img`.
fn binned_image(core: &FsCore<MemStorage>, snap: &str) -> Vec<u8> {
    let dir = core
        .lookup(RECYCLE_BIN_DIR, OsStr::new(snap))
        .expect("in the bin");
    let image = core
        .lookup(dir.ino, OsStr::new("volume.img"))
        .expect("volume.img");
    core.read_file(image.ino).expect("read binned image")
}

fn binned_info(core: &FsCore<MemStorage>, snap: &str) -> toml::Table {
    let dir = core
        .lookup(RECYCLE_BIN_DIR, OsStr::new(snap))
        .expect("in the bin");
    let info = core.lookup(dir.ino, OsStr::new("info")).expect("info");
    let text = core.read_file(info.ino).expect("read info");
    toml::from_str(&String::from_utf8_lossy(&text)).expect("TOML")
}

/// Volume `db` with snapshots a, b, c, each after a write of its own.
fn three_snapshots(core: &FsCore<MemStorage>) -> [Vec<u8>; 3] {
    core.new_volume("db").expect("volume");
    core.write_volume("db", 0, &pattern(8 * BLOCK, 1))
        .expect("write");
    core.snapshot_now("db@a");
    core.write_volume("db", 2 * BLOCK as u64, &pattern(3 * BLOCK, 2))
        .expect("write");
    core.snapshot_now("db@b");
    core.write_volume("db", 3 * BLOCK as u64, &pattern(BLOCK, 3))
        .expect("write");
    core.snapshot_now("db@c");
    ["db@a", "db@b", "db@c"].map(|s| core.read_image(s).expect(s))
}

fn now_plus(secs: u64) -> Timestamp {
    Timestamp(Timestamp::now().0 + secs as i64 * 1_000_000_000)
}

#[test]
fn a_deleted_snapshot_waits_in_the_bin_and_comes_back_whole() {
    let storage = MemStorage::new();
    let core = start(&storage, &bin_settings()).expect("start");
    let images = three_snapshots(&core);
    let changed_c = core
        .read_file(core.snapshot_file("db@c", "changed").unwrap())
        .unwrap();

    rmdir(&core, "db@b").expect("rmdir");
    assert_eq!(core.status("db@b"), None, "gone from snapshots/");
    assert_eq!(binned(&core), ["db@b"]);
    assert!(
        core.readdir(ROOT)
            .unwrap()
            .iter()
            .any(|e| e.name == RECYCLE_BIN)
    );
    assert_eq!(binned_image(&core, "db@b"), images[1]);
    let info = binned_info(&core, "db@b");
    assert!(info.contains_key("deleted"), "{info:?}");
    assert!(info.contains_key("purge_after"), "{info:?}");
    // Its neighbours read as before, and the listing of changes is unchanged.
    assert_eq!(core.read_image("db@c").unwrap(), images[2]);
    assert_eq!(
        core.read_file(core.snapshot_file("db@c", "changed").unwrap())
            .unwrap(),
        changed_c
    );

    // The name stays taken; nothing about it can change but its place.
    assert_eq!(errno(core.snapshot("db@b")), libc::EEXIST);
    let dir = core.lookup(RECYCLE_BIN_DIR, OsStr::new("db@b")).unwrap();
    let set = core.setxattr(
        dir.ino,
        OsStr::new("user.tag"),
        Some(b"x"),
        XattrFlags::default(),
        &root(),
    );
    assert_eq!(errno(set), libc::EPERM);
    assert_eq!(
        errno(core.mkdir(RECYCLE_BIN_DIR, OsStr::new("db@d"), &root())),
        libc::EPERM
    );

    // Only its owner restores it, under its own name.
    let bob = Caller::with_groups(1000, 1000, vec![]);
    assert_eq!(errno(restore(&core, "db@b", &bob)), libc::EPERM);
    let renamed = core.rename(
        RECYCLE_BIN_DIR,
        OsStr::new("db@b"),
        SNAPSHOTS_DIR,
        OsStr::new("db@other"),
        false,
        &root(),
    );
    assert_eq!(errno(renamed), libc::EINVAL);
    restore(&core, "db@b", &root()).expect("mv recycle-bin/db@b snapshots/");
    assert!(binned(&core).is_empty());
    assert_eq!(core.read_image("db@b").unwrap(), images[1]);
    assert_eq!(core.status("db@b").as_deref(), Some("completed"));
    assert!(!core.info("db@b").contains_key("deleted"));

    // Deleted again and kept over a restart, then restored once more.
    rmdir(&core, "db@b").expect("rmdir");
    drop(core);
    let storage = storage.restart(CrashMode::PowerLoss);
    let core = start(&storage, &bin_settings()).expect("restart");
    assert_eq!(binned(&core), ["db@b"]);
    restore(&core, "db@b", &root()).expect("restore after a restart");
    for (snap, image) in ["db@a", "db@b", "db@c"].iter().zip(&images) {
        assert_eq!(&core.read_image(snap).unwrap(), image, "{snap}");
    }
}

#[test]
fn the_bin_is_purged_after_its_period_without_breaking_other_snapshots() {
    let storage = MemStorage::new();
    let core = start(&storage, &bin_settings()).expect("start");
    let images = three_snapshots(&core);
    rmdir(&core, "db@b").expect("rmdir");

    let pass = core.purge_recycle_bin(Timestamp::now());
    assert!(pass.purged.is_empty());
    let due = pass.next.expect("a purge is due");
    assert!(
        due > now_plus(HOUR - 60) && due <= now_plus(HOUR),
        "{due:?}"
    );

    let pass = core.purge_recycle_bin(now_plus(HOUR + 1));
    assert_eq!(pass.purged, ["db@b"]);
    assert_eq!(pass.next, None);
    assert!(binned(&core).is_empty());
    assert_eq!(core.read_image("db@a").unwrap(), images[0]);
    assert_eq!(core.read_image("db@c").unwrap(), images[2]);
    // The name is free again.
    core.snapshot_now("db@b");

    // `rmdir recycle-bin/X` purges at once; only the owner may.
    rmdir(&core, "db@a").expect("rmdir");
    let bob = Caller::with_groups(1000, 1000, vec![]);
    assert_eq!(
        errno(core.rmdir(RECYCLE_BIN_DIR, OsStr::new("db@a"), &bob)),
        libc::EPERM
    );
    core.rmdir(RECYCLE_BIN_DIR, OsStr::new("db@a"), &root())
        .expect("purge");
    assert!(binned(&core).is_empty());
    assert_eq!(core.read_image("db@c").unwrap(), images[2]);
    drop(core);
    let core = start(&storage.restart(CrashMode::Process), &bin_settings()).expect("restart");
    assert_eq!(core.read_image("db@c").unwrap(), images[2]);
    assert_eq!(core.status("db@a"), None);
}

#[test]
fn locked_and_pending_snapshots_do_not_go_to_the_bin() {
    let storage = MemStorage::new();
    let core = start(&storage, &bin_settings()).expect("start");
    three_snapshots(&core);
    let dir = core.lookup(SNAPSHOTS_DIR, OsStr::new("db@a")).unwrap();
    core.setxattr(
        dir.ino,
        OsStr::new("user.ebsfs.lock"),
        Some(b"2200-01-01T00:00:00Z"),
        XattrFlags::default(),
        &root(),
    )
    .expect("lock");
    assert_eq!(errno(rmdir(&core, "db@a")), libc::EPERM);
    assert!(binned(&core).is_empty());

    // A pending snapshot is cancelled, as without a bin: there is nothing to keep.
    core.write_volume("db", 0, &pattern(BLOCK, 9)).unwrap();
    core.snapshot("db@d").expect("mkdir");
    rmdir(&core, "db@d").expect("rmdir pending");
    assert!(binned(&core).is_empty());
    assert_eq!(core.status("db@d"), None);
    core.snapshot_now("db@d");
}

#[test]
fn without_a_bin_there_is_no_directory_and_deletion_is_immediate() {
    let storage = MemStorage::new();
    let core = start(&storage, &settings()).expect("start");
    three_snapshots(&core);
    assert_eq!(
        errno(core.lookup(ROOT, OsStr::new(RECYCLE_BIN))),
        libc::ENOENT
    );
    rmdir(&core, "db@b").expect("rmdir");
    core.snapshot_now("db@b");
}

#[test]
fn a_crash_at_any_point_of_the_move_leaves_the_snapshot_whole_in_one_place() {
    let mut crash_at = 1;
    loop {
        let storage = MemStorage::new();
        let core = start(&storage, &bin_settings()).expect("start");
        let images = three_snapshots(&core);
        storage.crash_after(crash_at);
        let moved = rmdir(&core, "db@b").is_ok();
        let crashed = storage.has_crashed();
        drop(core);
        let storage = storage.restart(CrashMode::PowerLoss);
        let core = start(&storage, &bin_settings())
            .unwrap_or_else(|e| panic!("crash at operation {crash_at}: {e}"));
        let in_bin = binned(&core) == ["db@b"];
        let visible = core.status("db@b").as_deref() == Some("completed");
        assert!(
            in_bin != visible,
            "crash at {crash_at}: in the bin {in_bin}, visible {visible}"
        );
        if moved && !crashed {
            assert!(in_bin, "a move that returned is durable");
        }
        if in_bin {
            assert_eq!(binned_image(&core, "db@b"), images[1]);
            restore(&core, "db@b", &root()).expect("restore");
        }
        for (snap, image) in ["db@a", "db@b", "db@c"].iter().zip(&images) {
            assert_eq!(
                &core.read_image(snap).unwrap(),
                image,
                "{snap} at {crash_at}"
            );
        }
        if moved && !crashed {
            break;
        }
        crash_at += 1;
    }
    assert!(crash_at > 1, "the move took only {crash_at} operation");
}

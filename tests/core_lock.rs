//! Snapshot locks (`user.ebsfs.lock`), in-process: a locked snapshot cannot be deleted
//! by anyone until the time passes; a lock is extended, never shortened or removed.

mod core_support;

use std::ffi::OsStr;
use std::time::Duration;

use core_support::{CoreOps, pattern, root, settings, start};
use ebsfs::fs::inode::SNAPSHOTS_DIR;
use ebsfs::fs::{Caller, FsCore, FsResult, XattrFlags};
use ebsfs::namespace::Timestamp;
use ebsfs::storage::memory::MemStorage;

fn set_lock(core: &FsCore<MemStorage>, snap: &str, value: Option<&str>) -> FsResult<()> {
    let dir = core
        .lookup(SNAPSHOTS_DIR, OsStr::new(snap))
        .expect("snapshot")
        .ino;
    core.setxattr(
        dir,
        OsStr::new("user.ebsfs.lock"),
        value.map(str::as_bytes),
        XattrFlags::default(),
        &root(),
    )
}

fn errno<T>(result: FsResult<T>) -> i32 {
    result.err().map_or(0, |e| e.errno())
}

fn rmdir(core: &FsCore<MemStorage>, snap: &str, caller: &Caller) -> FsResult<()> {
    core.rmdir(SNAPSHOTS_DIR, OsStr::new(snap), caller)
}

#[test]
fn a_locked_snapshot_cannot_be_deleted_even_by_root_until_its_time() {
    let storage = MemStorage::new();
    let core = start(&storage, &settings()).expect("start");
    core.new_volume("db").expect("create");
    core.write_volume("db", 0, &pattern(20_000, 1))
        .expect("write");
    core.snapshot_now("db@kept");
    core.snapshot_now("db@brief");

    set_lock(&core, "db@kept", Some("2200-01-01T00:00:00Z")).expect("lock");
    assert_eq!(errno(rmdir(&core, "db@kept", &root())), libc::EPERM);
    assert_eq!(
        core.info("db@kept")
            .get("locked_until")
            .and_then(|v| v.as_str()),
        Some("2200-01-01T00:00:00.000Z")
    );
    // Shortened or removed: refused. Extended: fine.
    assert_eq!(
        errno(set_lock(&core, "db@kept", Some("2199-01-01T00:00:00Z"))),
        libc::EPERM
    );
    assert_eq!(errno(set_lock(&core, "db@kept", None)), libc::EPERM);
    set_lock(&core, "db@kept", Some("2201-01-01T00:00:00Z")).expect("extend");
    assert_eq!(errno(rmdir(&core, "db@kept", &root())), libc::EPERM);
    assert_eq!(
        errno(set_lock(&core, "db@kept", Some("next tuesday"))),
        libc::EINVAL
    );
    // The snapshot is whole, and a restart keeps the lock.
    assert_eq!(
        core.read_image("db@kept").expect("image"),
        pattern(20_000, 1)
    );
    core.shutdown();
    drop(core);
    let storage = storage.restart(ebsfs::storage::memory::CrashMode::Process);
    let core = start(&storage, &settings()).expect("restart");
    assert_eq!(errno(rmdir(&core, "db@kept", &root())), libc::EPERM);

    // A lock that has run out holds nothing.
    let soon = Timestamp(Timestamp::now().0 + 1_000_000_000).to_rfc3339();
    set_lock(&core, "db@brief", Some(&soon)).expect("lock briefly");
    assert_eq!(errno(rmdir(&core, "db@brief", &root())), libc::EPERM);
    std::thread::sleep(Duration::from_millis(1200));
    rmdir(&core, "db@brief", &root()).expect("rmdir after the lock ran out");
}

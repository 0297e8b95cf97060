//! A crash in the middle of a snapshot, on in-memory storage that can lose power at
//! any operation: after the restart, nothing acknowledged is lost, the interrupted
//! snapshot is `error`, and the next snapshot holds every change.
//!
//! `cargo run --example crash_recovery`

use std::error::Error;
use std::ffi::OsStr;
use std::path::PathBuf;

use ebsfs::config::Settings;
use ebsfs::fs::inode::{SNAPSHOTS_DIR, VOLUMES_DIR};
use ebsfs::fs::{Caller, FsCore};
use ebsfs::snapshot::Scheduling;
use ebsfs::storage::memory::{CrashMode, MemStorage};

fn status(core: &FsCore<MemStorage>, name: &str) -> Result<String, Box<dyn Error>> {
    let dir = core.lookup(SNAPSHOTS_DIR, OsStr::new(name))?;
    let file = core.lookup(dir.ino, OsStr::new("status"))?;
    let (fh, _) = core.open(file.ino, false)?;
    let mut text = [0u8; 16];
    let n = core.read(file.ino, fh, 0, &mut text)?;
    core.release(fh);
    Ok(String::from_utf8_lossy(&text[..n]).trim().to_string())
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut settings = Settings::embedded();
    settings.data_dir = PathBuf::from("/data");
    let me = Caller::with_groups(0, 0, vec![]);
    let storage = MemStorage::new();

    let core = FsCore::start(settings.clone(), storage.clone(), Scheduling::Manual)?;
    let volume = core.create_volume(VOLUMES_DIR, OsStr::new("db.img"), 0o600, &me, true)?;
    let (fh, _) = core.open(volume.ino, true)?;
    core.write(volume.ino, fh, 0, &vec![7u8; 256 << 10])?;
    core.fsync(volume.ino, fh, false)?;
    core.release(fh);
    core.mkdir(SNAPSHOTS_DIR, OsStr::new("db@one"), &me)?;

    // The host loses power a few storage operations into the capture.
    storage.crash_after(3);
    core.engine().run_queued();
    println!("crashed mid-capture: {}", storage.has_crashed());
    drop(core);

    let storage = storage.restart(CrashMode::PowerLoss);
    let core = FsCore::start(settings, storage, Scheduling::Manual)?;
    println!("db@one after the restart: {}", status(&core, "db@one")?);
    core.mkdir(SNAPSHOTS_DIR, OsStr::new("db@two"), &me)?;
    core.engine().run_queued();
    println!("db@two: {}", status(&core, "db@two")?);
    core.shutdown();
    Ok(())
}

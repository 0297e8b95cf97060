//! The core, in-process, on in-memory storage: create a volume, write to it, take a
//! snapshot, overwrite the volume, read the snapshot back, delete it. No FUSE, no
//! root. The calls are the ones the FUSE adapter makes for `truncate`, `dd`,
//! `mkdir snapshots/…`, `cat` and `rmdir`.
//!
//! `cargo run --example in_memory`

use std::error::Error;
use std::ffi::OsStr;
use std::path::PathBuf;

use ebsfs::config::Settings;
use ebsfs::fs::inode::{SNAPSHOTS_DIR, VOLUMES_DIR};
use ebsfs::fs::{Caller, FsCore};
use ebsfs::snapshot::Scheduling;
use ebsfs::storage::memory::MemStorage;

fn main() -> Result<(), Box<dyn Error>> {
    let mut settings = Settings::embedded();
    settings.data_dir = PathBuf::from("/data");
    // Manual scheduling: captures run when asked, on this thread.
    let core = FsCore::start(settings, MemStorage::new(), Scheduling::Manual)?;
    let me = Caller::with_groups(0, 0, vec![]);

    // `touch volumes/db.img`, then write 1 MiB at offset 4 MiB.
    let volume = core.create_volume(VOLUMES_DIR, OsStr::new("db.img"), 0o600, &me, true)?;
    let (fh, _) = core.open(volume.ino, true)?;
    core.write(volume.ino, fh, 4 << 20, &vec![b'A'; 1 << 20])?;

    // `mkdir snapshots/db@before`: returns at once, status "pending".
    let snap = core.mkdir(SNAPSHOTS_DIR, OsStr::new("db@before"), &me)?;
    // Writes keep flowing while the snapshot is pending…
    core.write(volume.ino, fh, 4 << 20, &vec![b'B'; 1 << 20])?;
    core.release(fh);
    // …and the capture still sees the volume as it was at the mkdir.
    core.engine().run_queued();

    let status = core.lookup(snap.ino, OsStr::new("status"))?;
    let (status_fh, _) = core.open(status.ino, false)?;
    let mut text = [0u8; 16];
    let n = core.read(status.ino, status_fh, 0, &mut text)?;
    core.release(status_fh);
    println!("db@before: {}", String::from_utf8_lossy(&text[..n]).trim());

    let image = core.lookup(snap.ino, OsStr::new("volume.img"))?;
    let (image_fh, _) = core.open(image.ino, false)?;
    let mut block = vec![0u8; 4096];
    core.read(image.ino, image_fh, 4 << 20, &mut block)?;
    println!(
        "snapshot at 4 MiB: {:?}, live volume at 4 MiB: {:?}",
        block[0] as char,
        {
            let (fh, _) = core.open(volume.ino, false)?;
            let mut live = [0u8; 1];
            core.read(volume.ino, fh, 4 << 20, &mut live)?;
            core.release(fh);
            live[0] as char
        }
    );
    core.release(image_fh);

    // `rmdir snapshots/db@before`.
    core.rmdir(SNAPSHOTS_DIR, OsStr::new("db@before"), &me)?;
    println!(
        "after rmdir: {} snapshots",
        core.readdir(SNAPSHOTS_DIR)?.len() - 2
    );
    core.shutdown();
    Ok(())
}

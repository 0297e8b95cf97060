//! The core on a real data directory (a temporary one), without mounting: what
//! `ebsfs mount` opens, minus FUSE. Stops cleanly, opens again, reads the snapshot.
//! Needs no root.
//!
//! `cargo run --example data_directory`

use std::error::Error;
use std::ffi::OsStr;

use ebsfs::config::Settings;
use ebsfs::fs::inode::{SNAPSHOTS_DIR, VOLUMES_DIR};
use ebsfs::fs::{Caller, FsCore};
use ebsfs::snapshot::Scheduling;
use ebsfs::storage::linux::LinuxStorage;

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let mut settings = Settings::embedded();
    settings.data_dir = dir.path().join("data");
    // SAFETY: geteuid only reads the process's credentials.
    let uid = unsafe { libc::geteuid() };
    let me = Caller::with_groups(uid, uid, vec![]);

    let core = FsCore::start(settings.clone(), LinuxStorage, Scheduling::Threads)?;
    let volume = core.create_volume(VOLUMES_DIR, OsStr::new("web.img"), 0o600, &me, true)?;
    let (fh, _) = core.open(volume.ino, true)?;
    core.write(volume.ino, fh, 0, b"hello from a volume")?;
    core.release(fh);
    core.mkdir(SNAPSHOTS_DIR, OsStr::new("web@first"), &me)?;
    // Threaded scheduling: the capture runs in the background; shutdown waits for it.
    core.shutdown();
    drop(core);

    let core = FsCore::start(settings.clone(), LinuxStorage, Scheduling::Threads)?;
    let snap = core.lookup(SNAPSHOTS_DIR, OsStr::new("web@first"))?;
    let image = core.lookup(snap.ino, OsStr::new("volume.img"))?;
    let (fh, _) = core.open(image.ino, false)?;
    let mut text = vec![0u8; 19];
    core.read(image.ino, fh, 0, &mut text)?;
    core.release(fh);
    println!("web@first: {:?}", String::from_utf8_lossy(&text));
    println!("files in {}:", settings.data_dir.display());
    for entry in std::fs::read_dir(&settings.data_dir)? {
        println!("  {}", entry?.file_name().to_string_lossy());
    }
    core.shutdown();
    Ok(())
}

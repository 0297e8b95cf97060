//! In-process access to the FUSE-free core on in-memory storage, for tests that need
//! no root: start a data directory, drive volumes and snapshots the way the FUSE
//! adapter does, crash and restart.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::PathBuf;

use ebsfs::config::Settings;
use ebsfs::fs::inode::{SNAPSHOTS_DIR, VOLUMES_DIR};
use ebsfs::fs::{Caller, FsCore, FsError};
use ebsfs::snapshot::Scheduling;
use ebsfs::storage::memory::MemStorage;

pub const DATA: &str = "/data";

pub fn root() -> Caller {
    Caller::with_groups(0, 0, vec![])
}

/// Settings for small in-memory data directories.
pub fn settings() -> Settings {
    let mut settings = Settings::embedded();
    settings.data_dir = PathBuf::from(DATA);
    settings.block_size_bytes = 16 << 10;
    settings.capture_threads = 1;
    settings.cache_size_bytes = 1 << 20;
    settings
}

pub fn start(storage: &MemStorage, settings: &Settings) -> Result<FsCore<MemStorage>, FsError> {
    FsCore::start(settings.clone(), storage.clone(), Scheduling::Manual)
}

/// Operations on a running core, by name, as a user of the mount would do them.
pub trait CoreOps {
    fn core(&self) -> &FsCore<MemStorage>;

    fn volume_ino(&self, name: &str) -> Option<u64> {
        self.core()
            .lookup(VOLUMES_DIR, OsStr::new(&format!("{name}.img")))
            .ok()
            .map(|a| a.ino)
    }

    fn new_volume(&self, name: &str) -> Result<(), FsError> {
        let file = format!("{name}.img");
        self.core()
            .create_volume(VOLUMES_DIR, OsStr::new(&file), 0o644, &root(), true)
            .map(|_| ())
    }

    fn write_volume(&self, name: &str, offset: u64, data: &[u8]) -> Result<(), FsError> {
        let ino = self.volume_ino(name).expect("volume exists");
        let (fh, _) = self.core().open(ino, true)?;
        let result = self.core().write(ino, fh, offset, data).map(|_| ());
        self.core().release(fh);
        result
    }

    /// Reads a whole volume.
    fn read_volume(&self, name: &str) -> Result<Vec<u8>, FsError> {
        let ino = self.volume_ino(name).expect("volume exists");
        let (fh, _) = self.core().open(ino, false)?;
        let size = self.core().getattr(ino)?.size as usize;
        let mut buf = vec![0u8; size];
        let result = self.core().read(ino, fh, 0, &mut buf);
        self.core().release(fh);
        let n = result?;
        assert_eq!(n, size, "short read of volume {name}");
        Ok(buf)
    }

    /// `mkdir snapshots/<name>`.
    fn snapshot(&self, name: &str) -> Result<(), FsError> {
        self.core()
            .mkdir(SNAPSHOTS_DIR, OsStr::new(name), &root())
            .map(|_| ())
    }

    /// `mkdir` and runs the capture to its end.
    fn snapshot_now(&self, name: &str) {
        self.snapshot(name)
            .unwrap_or_else(|e| panic!("mkdir {name}: {e}"));
        self.core().engine().run_queued();
        assert_eq!(self.status(name).as_deref(), Some("completed"), "{name}");
    }

    fn snapshot_file(&self, name: &str, file: &str) -> Option<u64> {
        let dir = self.core().lookup(SNAPSHOTS_DIR, OsStr::new(name)).ok()?;
        self.core()
            .lookup(dir.ino, OsStr::new(file))
            .ok()
            .map(|a| a.ino)
    }

    /// A snapshot's `status`, `None` if it does not exist.
    fn status(&self, name: &str) -> Option<String> {
        let text = self.read_file(self.snapshot_file(name, "status")?).ok()?;
        Some(String::from_utf8_lossy(&text).trim().to_string())
    }

    /// A snapshot's `info`.
    fn info(&self, name: &str) -> toml::Table {
        let ino = self.snapshot_file(name, "info").expect("snapshot exists");
        let text = self.read_file(ino).expect("read info");
        toml::from_str(&String::from_utf8_lossy(&text)).expect("info is TOML")
    }

    /// Opens and reads a whole file of the mount.
    fn read_file(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let (fh, _) = self.core().open(ino, false)?;
        let result = self.read_handle(ino, fh);
        self.core().release(fh);
        result
    }

    /// Reads through an open handle until the end.
    fn read_handle(&self, ino: u64, fh: u64) -> Result<Vec<u8>, FsError> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 40_000];
        loop {
            let n = self.core().read(ino, fh, out.len() as u64, &mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// A snapshot's whole image.
    fn read_image(&self, name: &str) -> Result<Vec<u8>, FsError> {
        let ino = self
            .snapshot_file(name, "volume.img")
            .unwrap_or_else(|| panic!("snapshot {name} is gone"));
        self.read_file(ino)
    }
}

impl CoreOps for FsCore<MemStorage> {
    fn core(&self) -> &FsCore<MemStorage> {
        self
    }
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
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

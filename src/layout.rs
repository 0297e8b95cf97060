//! The data directory: where every file lives, the format marker, and the one way
//! doubtful files leave their place (to `lost+found/`, never deleted).
//!
//! ```text
//! ebsfs.format              format marker: `format = 1`; written first, never changed
//! ebsfs.redb                metadata database (namespace/tables.rs)
//! ebsfs.lock                flock held by the running daemon
//! session                   present while mounted; left behind by a crash
//! volumes/<id>.raw          live volume data, sparse
//! volumes/<id>.dirty        blocks changed since the volume's last snapshot
//! volumes/<id>.dirty.new    a fresh dirty map being put in place by a freeze
//! volumes/<id>.present      blocks a volume made from a snapshot holds itself
//! captures/<vol>-<snap>.set capture set of a pending snapshot (a former dirty map)
//! captures/<vol>-<snap>.cow pages preserved for a pending snapshot
//! chunks/pack-<n>.dat       snapshot chunks
//! lost+found/               files a start-up sweep could not account for
//! ```
//!
//! File names are built here and nowhere else. docs/FORMAT.md describes the formats
//! and the crash-consistency argument.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};

use log::warn;

use crate::namespace::{SnapshotId, VolumeId};
use crate::storage::{OpenOptions, Storage, StorageFile, publish_file};

/// Version of the data directory layout this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;

const MARKER_FILE: &str = "ebsfs.format";
const DATABASE_FILE: &str = "ebsfs.redb";
const LOCK_FILE: &str = "ebsfs.lock";
const SESSION_FILE: &str = "session";
const LOG_FILE: &str = "ebsfs.log";
const VOLUMES_DIR: &str = "volumes";
const CAPTURES_DIR: &str = "captures";
const CHUNKS_DIR: &str = "chunks";
const LOST_FOUND_DIR: &str = "lost+found";

/// Paths inside one data directory.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

/// The files of a volume in `volumes/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeFile {
    Data,
    Dirty,
    DirtyNew,
    /// Which blocks of a volume made from a snapshot its data file holds.
    Present,
}

impl VolumeFile {
    fn suffix(self) -> &'static str {
        match self {
            VolumeFile::Data => "raw",
            VolumeFile::Dirty => "dirty",
            VolumeFile::DirtyNew => "dirty.new",
            VolumeFile::Present => "present",
        }
    }
}

/// The files of a pending snapshot in `captures/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureFile {
    Set,
    Cow,
}

impl CaptureFile {
    fn suffix(self) -> &'static str {
        match self {
            CaptureFile::Set => "set",
            CaptureFile::Cow => "cow",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "{dir} holds ebsfs files ({found}) but no format marker (ebsfs.format): refusing to \
         start as if it were empty. Run `ebsfs check {dir}` to see what is there"
    )]
    NoMarker { dir: String, found: String },
    #[error(
        "{dir} has data format {found}; this ebsfs reads format {FORMAT_VERSION}: use a newer ebsfs"
    )]
    Newer { dir: String, found: u64 },
    #[error("{dir}: the format marker ebsfs.format is damaged: {reason}")]
    BadMarker { dir: String, reason: String },
    #[error("{dir}: {source}")]
    Io { dir: String, source: io::Error },
}

/// Why [`Layout::claim`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another process holds the lock; `holder` names it for messages (`pid 42`).
    #[error("in use by another ebsfs ({holder})")]
    InUse { holder: String },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn marker(&self) -> PathBuf {
        self.root.join(MARKER_FILE)
    }

    pub fn database(&self) -> PathBuf {
        self.root.join(DATABASE_FILE)
    }

    pub fn lock_file(&self) -> PathBuf {
        self.root.join(LOCK_FILE)
    }

    pub fn session(&self) -> PathBuf {
        self.root.join(SESSION_FILE)
    }

    pub fn log_file(&self) -> PathBuf {
        self.root.join(LOG_FILE)
    }

    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join(VOLUMES_DIR)
    }

    pub fn captures_dir(&self) -> PathBuf {
        self.root.join(CAPTURES_DIR)
    }

    pub fn chunks_dir(&self) -> PathBuf {
        self.root.join(CHUNKS_DIR)
    }

    pub fn lost_found_dir(&self) -> PathBuf {
        self.root.join(LOST_FOUND_DIR)
    }

    pub fn volume_file(&self, id: VolumeId, kind: VolumeFile) -> PathBuf {
        self.volumes_dir().join(format!("{id}.{}", kind.suffix()))
    }

    pub fn capture_file(
        &self,
        volume: VolumeId,
        snapshot: SnapshotId,
        kind: CaptureFile,
    ) -> PathBuf {
        self.captures_dir()
            .join(format!("{volume}-{snapshot}.{}", kind.suffix()))
    }

    pub fn pack(&self, id: u32) -> PathBuf {
        self.chunks_dir().join(format!("pack-{id:08}.dat"))
    }

    /// Claims the data directory for this process (one daemon or `ebsfs check` at a
    /// time) and writes this process's pid into the lock file for messages.
    pub fn claim<S: Storage>(&self, storage: &S) -> Result<S::Lock, ClaimError> {
        let path = self.lock_file();
        match storage.try_lock(&path) {
            Ok(lock) => {
                let pid = format!("{}\n", std::process::id());
                let file = storage.open(&path, OpenOptions::CREATE)?;
                file.set_len(0)?;
                file.write_all_at(pid.as_bytes(), 0)?;
                Ok(lock)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let holder = crate::storage::read_file(storage, &path)
                    .ok()
                    .flatten()
                    .and_then(|b| String::from_utf8_lossy(&b).trim().parse::<u32>().ok())
                    .map_or_else(|| "pid unknown".to_string(), |pid| format!("pid {pid}"));
                Err(ClaimError::InUse { holder })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the directories of a data directory.
    pub fn create_dirs<S: Storage>(&self, storage: &S) -> io::Result<()> {
        for dir in [self.volumes_dir(), self.captures_dir(), self.chunks_dir()] {
            storage.create_dir_all(&dir)?;
        }
        Ok(())
    }

    /// Checks the format marker. A directory without one is initialised (marker
    /// written, durably, before anything else) only if it holds no ebsfs files;
    /// returns whether it was.
    pub fn check_format<S: Storage>(&self, storage: &S) -> Result<bool, FormatError> {
        let dir = self.root.display().to_string();
        let io_err = |source| FormatError::Io {
            dir: dir.clone(),
            source,
        };
        match self.read_format(storage)? {
            Some(_) => Ok(false),
            None => {
                let found = self.ebsfs_files(storage).map_err(io_err)?;
                if !found.is_empty() {
                    return Err(FormatError::NoMarker {
                        dir,
                        found: found.join(", "),
                    });
                }
                storage.create_dir_all(&self.root).map_err(io_err)?;
                publish_file(storage, &self.marker(), marker_text().as_bytes()).map_err(io_err)?;
                Ok(true)
            }
        }
    }

    /// The format the marker names, `None` when there is no marker; a damaged marker
    /// or a newer format is an error. Writes nothing.
    pub fn read_format<S: Storage>(&self, storage: &S) -> Result<Option<u64>, FormatError> {
        let dir = self.root.display().to_string();
        let bytes = crate::storage::read_file(storage, &self.marker()).map_err(|source| {
            FormatError::Io {
                dir: dir.clone(),
                source,
            }
        })?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let found = parse_marker(&bytes).map_err(|reason| FormatError::BadMarker {
            dir: dir.clone(),
            reason,
        })?;
        if found > FORMAT_VERSION {
            return Err(FormatError::Newer { dir, found });
        }
        Ok(Some(found))
    }

    /// Writes the format marker (for `ebsfs check --repair`).
    pub fn write_marker<S: Storage>(&self, storage: &S) -> io::Result<()> {
        publish_file(storage, &self.marker(), marker_text().as_bytes())
    }

    /// The files that make a directory an ebsfs data directory: the database, volume
    /// data and dirty maps, capture files and packs (a few names, for messages).
    pub fn ebsfs_files<S: Storage>(&self, storage: &S) -> io::Result<Vec<String>> {
        let mut found = Vec::new();
        if storage.file_len(&self.database())?.is_some() {
            found.push(DATABASE_FILE.to_string());
        }
        for (dir, name) in [
            (self.volumes_dir(), VOLUMES_DIR),
            (self.captures_dir(), CAPTURES_DIR),
            (self.chunks_dir(), CHUNKS_DIR),
        ] {
            let count = list_or_empty(storage, &dir)?.len();
            if count > 0 {
                found.push(format!("{count} files in {name}/"));
            }
        }
        Ok(found)
    }

    /// Whether data files (volume data or packs) exist: what a lost database must not
    /// be mistaken as "empty" for.
    pub fn has_data_files<S: Storage>(&self, storage: &S) -> io::Result<bool> {
        let volumes = list_or_empty(storage, &self.volumes_dir())?;
        let packs = list_or_empty(storage, &self.chunks_dir())?;
        Ok(volumes
            .iter()
            .any(|n| parse_volume_file(n).is_some_and(|(_, k)| k == VolumeFile::Data))
            || packs.iter().any(|n| parse_pack_file(n).is_some()))
    }

    /// Moves `path` into `lost+found/` (never deleting it) and logs why, at WARN.
    /// Returns the new path.
    pub fn move_to_lost_found<S: Storage>(
        &self,
        storage: &S,
        path: &Path,
        reason: &str,
    ) -> io::Result<PathBuf> {
        let dir = self.lost_found_dir();
        storage.create_dir_all(&dir)?;
        let relative = path.strip_prefix(&self.root).unwrap_or(path);
        let flat = relative.to_string_lossy().replace('/', "_");
        let mut target = dir.join(&flat);
        let mut n = 1;
        while storage.file_len(&target).unwrap_or(None).is_some() {
            target = dir.join(format!("{flat}.{n}"));
            n += 1;
        }
        storage.rename(path, &target)?;
        storage.sync_dir(&dir)?;
        storage.sync_dir(crate::storage::parent_of(path))?;
        warn!("moved {} to {}: {reason}", path.display(), target.display());
        Ok(target)
    }
}

fn list_or_empty<S: Storage>(storage: &S, dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
    match storage.list_dir(dir) {
        Ok(names) => Ok(names),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn marker_text() -> String {
    format!(
        "# ebsfs data directory: do not edit or delete this file (docs/FORMAT.md)\n\
         format = {FORMAT_VERSION}\n"
    )
}

fn parse_marker(bytes: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let table: toml::Table = toml::from_str(text).map_err(|e| e.message().to_string())?;
    table
        .get("format")
        .and_then(toml::Value::as_integer)
        .and_then(|v| u64::try_from(v).ok())
        .ok_or_else(|| "no `format = N` line".to_string())
}

/// Parses a name in `volumes/`: `<id>.raw`, `<id>.dirty`, `<id>.dirty.new`.
pub fn parse_volume_file(name: &OsStr) -> Option<(VolumeId, VolumeFile)> {
    let (id, suffix) = name.to_str()?.split_once('.')?;
    let kind = [
        VolumeFile::Data,
        VolumeFile::Dirty,
        VolumeFile::DirtyNew,
        VolumeFile::Present,
    ]
    .into_iter()
    .find(|k| k.suffix() == suffix)?;
    Some((VolumeId(parse_id(id)?), kind))
}

/// Parses a name in `captures/`: `<volume>-<snapshot>.set|cow`.
pub fn parse_capture_file(name: &OsStr) -> Option<(VolumeId, SnapshotId, CaptureFile)> {
    let (stem, suffix) = name.to_str()?.split_once('.')?;
    let (volume, snapshot) = stem.split_once('-')?;
    let kind = [CaptureFile::Set, CaptureFile::Cow]
        .into_iter()
        .find(|k| k.suffix() == suffix)?;
    Some((
        VolumeId(parse_id(volume)?),
        SnapshotId(parse_id(snapshot)?),
        kind,
    ))
}

/// Parses a name in `chunks/`: `pack-<id>.dat`.
pub fn parse_pack_file(name: &OsStr) -> Option<u32> {
    name.to_str()?
        .strip_prefix("pack-")?
        .strip_suffix(".dat")?
        .parse()
        .ok()
}

/// Decimal ids only (no sign, no spaces): what [`Layout`] writes.
fn parse_id(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemStorage;

    #[test]
    fn names_round_trip() {
        let layout = Layout::new("/data");
        let path = layout.volume_file(VolumeId(7), VolumeFile::DirtyNew);
        assert_eq!(
            parse_volume_file(path.file_name().unwrap()),
            Some((VolumeId(7), VolumeFile::DirtyNew))
        );
        let path = layout.capture_file(VolumeId(3), SnapshotId(12), CaptureFile::Cow);
        assert_eq!(
            parse_capture_file(path.file_name().unwrap()),
            Some((VolumeId(3), SnapshotId(12), CaptureFile::Cow))
        );
        assert_eq!(
            parse_pack_file(layout.pack(5).file_name().unwrap()),
            Some(5)
        );
        for bad in ["x.raw", "+1.raw", "1.raw.bak", "1", ".raw"] {
            assert_eq!(parse_volume_file(OsStr::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn a_directory_with_files_but_no_marker_is_refused() {
        let storage = MemStorage::new();
        let layout = Layout::new("/data");
        storage.create_dir_all(&layout.volumes_dir()).unwrap();
        storage
            .open(
                &layout.volume_file(VolumeId(1), VolumeFile::Data),
                OpenOptions::CREATE,
            )
            .unwrap();
        let err = layout.check_format(&storage).unwrap_err();
        assert!(matches!(err, FormatError::NoMarker { .. }), "{err}");
        assert!(err.to_string().contains("ebsfs check"));
        assert!(layout.has_data_files(&storage).unwrap());
    }

    #[test]
    fn an_empty_directory_is_initialised_and_a_newer_one_refused() {
        let storage = MemStorage::new();
        let layout = Layout::new("/data");
        assert!(layout.check_format(&storage).unwrap());
        assert!(!layout.check_format(&storage).unwrap());
        publish_file(&storage, &layout.marker(), b"format = 99\n").unwrap();
        assert!(matches!(
            layout.check_format(&storage),
            Err(FormatError::Newer { found: 99, .. })
        ));
    }

    #[test]
    fn lost_and_found_never_overwrites() {
        let storage = MemStorage::new();
        let layout = Layout::new("/data");
        layout.create_dirs(&storage).unwrap();
        for round in 0..2 {
            let path = layout.volume_file(VolumeId(1), VolumeFile::Data);
            let f = storage.open(&path, OpenOptions::CREATE).unwrap();
            f.write_all_at(&[round], 0).unwrap();
            layout.move_to_lost_found(&storage, &path, "test").unwrap();
        }
        let names = storage.list_dir(&layout.lost_found_dir()).unwrap();
        assert_eq!(names, ["volumes_1.raw", "volumes_1.raw.1"]);
    }
}

//! Start-up: opening a data directory without ever mistaking damage for emptiness.
//!
//! In order:
//! 1. the directory's lock (`ebsfs.lock`), before any other file is touched, so a
//!    second daemon changes nothing;
//! 2. the format marker: an empty directory is initialised (marker first); one with
//!    ebsfs files but no marker, or a newer format, is refused;
//! 3. the metadata database: missing or empty while volume data or packs exist is
//!    refused, naming `ebsfs check --repair` — never taken as "no volumes";
//! 4. packs, volumes and their dirty maps: one damaged or missing file makes only its
//!    own volume damaged (served with `EIO`) or its chunks unreadable;
//! 5. sweeps: files nobody accounts for go to `lost+found/`; only files the database
//!    or the file's own name proves to be garbage ebsfs made are removed (temporaries
//!    of [`crate::storage::publish_file`], files of volumes whose deletion committed,
//!    empty files of a volume whose creation never committed);
//! 6. recovery of interrupted captures, then of a crash, then the session file.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use log::{error, info, warn};

use super::recovery::{self, LastStop, Session, data_dir_io_error};
use super::{FsError, FsResult, VolumeSlot, io_error};
use crate::config::Settings;
use crate::layout::{ClaimError, Layout, VolumeFile, parse_volume_file};
use crate::namespace::tables::NEXT_VOLUME_ID;
use crate::namespace::{Namespace, NamespaceError, VolumeId, VolumeRecord};
use crate::remote::RemoteStore;
use crate::snapshot::upload::Uploader;
use crate::snapshot::{Scheduling, SnapshotEngine};
use crate::storage::Storage;
use crate::store::ChunkStore;
use crate::volume::dirty::{DirtyMap, NEVER_SHRUNK};
use crate::volume::source::{SnapshotBlocks, Source};
use crate::volume::{Volume, VolumeError};

pub(super) struct Opened<S: Storage> {
    pub ns: Arc<Namespace>,
    pub engine: Arc<SnapshotEngine<S>>,
    pub volumes: HashMap<VolumeId, VolumeSlot<S>>,
    pub session: Session,
    pub lock: S::Lock,
}

pub(super) fn open<S: Storage>(
    settings: &Settings,
    storage: &S,
    scheduling: Scheduling,
    remote: Option<Arc<RemoteStore>>,
) -> FsResult<Opened<S>> {
    let layout = Layout::new(settings.data_dir.clone());
    storage
        .create_dir_all(layout.root())
        .map_err(data_dir_io_error(
            &layout,
            format!("creating {}", layout.root().display()),
        ))?;
    let lock = take_lock(storage, &layout)?;
    let initialised = layout.check_format(storage)?;
    let session = Session::last(storage, &layout)?;
    let ns = Arc::new(open_namespace(storage, &layout, initialised)?);
    layout.create_dirs(storage).map_err(data_dir_io_error(
        &layout,
        "creating the data directory's folders",
    ))?;
    let store = Arc::new(ChunkStore::open(
        storage,
        &layout,
        &ns,
        settings.compression_level,
        settings.cache_size_bytes,
    )?);
    let uploader = match remote {
        Some(remote) => {
            remote.set_instance(ns.instance()?);
            Some(Arc::new(Uploader::new(remote)))
        }
        None => None,
    };
    let engine = Arc::new(SnapshotEngine::new(
        storage,
        &layout,
        ns.clone(),
        store.clone(),
        settings.capture_threads,
        scheduling,
        uploader,
    ));
    let host_crash = session.last_stop == LastStop::HostCrash;
    let mut volumes = HashMap::new();
    let view = ns.view();
    for record in view.volumes.values() {
        let source = super::clones::source_blocks(&engine, &view, record);
        volumes.insert(
            record.id,
            open_volume(storage, &layout, record, settings, host_crash, source),
        );
    }
    let swept = sweep_volumes_dir(storage, &layout, &ns, &volumes)?;
    engine.start_settler();
    let live: HashMap<VolumeId, Arc<Volume<S>>> = volumes
        .iter()
        .filter_map(|(&id, slot)| match slot {
            VolumeSlot::Live(v) => Some((id, v.clone())),
            VolumeSlot::Damaged(_) => None,
        })
        .collect();
    let resumed = engine.recover(&live, !host_crash)?;
    recovery::after_crash(&session, &ns, &store)?;
    // After the repairs above: reclaiming unreferenced space runs with no capture.
    engine.start_resumed(resumed)?;
    engine.resume_uploads().map_err(FsError::Remote)?;
    engine.start_remote_worker();
    engine.start_catalog_poller();
    if !swept.is_empty() {
        let guard = ns.lock();
        ns.change(&guard, |c| c.forget_deleted_volumes(&swept))?;
    }
    session.record(storage)?;
    let damaged = volumes.len() - live.len();
    info!(
        "data directory {}: {} volumes{}, {} snapshots",
        layout.root().display(),
        live.len(),
        if damaged > 0 {
            format!(" ({damaged} more damaged)")
        } else {
            String::new()
        },
        ns.view().visible_snapshots().count()
    );
    Ok(Opened {
        ns,
        engine,
        volumes,
        session,
        lock,
    })
}

/// Takes the data directory's lock and writes this process's pid into it.
fn take_lock<S: Storage>(storage: &S, layout: &Layout) -> FsResult<S::Lock> {
    layout.claim(storage).map_err(|e| match e {
        ClaimError::InUse { holder } => FsError::DataDirInUse {
            data_dir: layout.root().display().to_string(),
            holder,
        },
        ClaimError::Io(source) => {
            data_dir_io_error(layout, format!("locking {}", layout.lock_file().display()))(source)
        }
    })
}

/// Opens the database. A missing or empty one is created only where nothing could be
/// lost: a directory just initialised, or one without volume data or packs.
fn open_namespace<S: Storage>(
    storage: &S,
    layout: &Layout,
    initialised: bool,
) -> FsResult<Namespace> {
    let path = layout.database();
    let len = storage
        .file_len(&path)
        .map_err(io_error(format!("reading {}", path.display())))?;
    let has_data = layout
        .has_data_files(storage)
        .map_err(io_error(format!("listing {}", layout.root().display())))?;
    let allow_init = initialised || !has_data;
    match Namespace::open(storage, &path, allow_init) {
        Ok(ns) => {
            if !initialised && len.unwrap_or(0) == 0 {
                warn!(
                    "{}: the metadata database was {}; the directory holds no volume data \
                     or chunks, so a new one was started",
                    layout.root().display(),
                    if len.is_none() { "missing" } else { "empty" }
                );
            }
            Ok(ns)
        }
        Err(NamespaceError::Missing) => Err(FsError::DatabaseLost {
            data_dir: layout.root().display().to_string(),
            state: if len.is_none() { "missing" } else { "empty" }.to_string(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Opens one volume; a volume whose files cannot be opened is served as damaged.
fn open_volume<S: Storage>(
    storage: &S,
    layout: &Layout,
    record: &VolumeRecord,
    settings: &Settings,
    host_crash: bool,
    source: Option<Arc<dyn SnapshotBlocks>>,
) -> VolumeSlot<S> {
    let open = || {
        let volume = Volume::open(
            storage,
            layout,
            record.id,
            u64::from(record.block_size),
            settings.max_volume_size_bytes,
        )?;
        if let Some(blocks) = source.clone() {
            // Which blocks the volume holds itself: without it, nothing can be read.
            let present =
                DirtyMap::open(storage, &layout.volume_file(record.id, VolumeFile::Present))
                    .map_err(|source| VolumeError::DirtyMap {
                        volume: record.id,
                        source,
                    })?;
            volume.reattach_source(Source::new(blocks, present, u64::from(record.block_size)))?;
        }
        Ok(volume)
    };
    let dirty_path = layout.volume_file(record.id, VolumeFile::Dirty);
    let result = match open() {
        Err(VolumeError::DirtyMap { source, .. }) if source.path() == dirty_path => {
            match repair_dirty_map(storage, layout, record.id, source.is_missing(), host_crash) {
                Ok(true) => open(),
                Ok(false) => Err(VolumeError::DirtyMap {
                    volume: record.id,
                    source,
                }),
                Err(e) => {
                    error!(
                        "volume {}: repairing its dirty map failed: {e}",
                        record.name
                    );
                    Err(VolumeError::DirtyMap {
                        volume: record.id,
                        source,
                    })
                }
            }
        }
        other => other,
    };
    match result {
        Ok(volume) => VolumeSlot::Live(Arc::new(volume)),
        Err(e) => {
            error!(
                "volume {} is damaged and will fail every open with EIO: {e} \
                 (run `ebsfs check` on the data directory)",
                record.name
            );
            VolumeSlot::Damaged(e.to_string().into())
        }
    }
}

/// Puts a volume's dirty map back in place where that is provably safe:
/// - a freeze was cut off between its two renames: `<id>.dirty.new` is a complete
///   fresh map (the old one is a capture set, absorbed by recovery);
/// - after a host crash, dirty maps are not trusted anyway (every block is compared):
///   a damaged one moves to `lost+found/` and an empty one replaces it.
///
/// Returns whether the map was repaired.
fn repair_dirty_map<S: Storage>(
    storage: &S,
    layout: &Layout,
    id: VolumeId,
    missing: bool,
    host_crash: bool,
) -> std::io::Result<bool> {
    let dirty = layout.volume_file(id, VolumeFile::Dirty);
    let fresh = layout.volume_file(id, VolumeFile::DirtyNew);
    if missing && DirtyMap::open(storage, &fresh).is_ok() {
        storage.rename(&fresh, &dirty)?;
        storage.sync_dir(&layout.volumes_dir())?;
        info!("volume {id}: a freeze was interrupted; its fresh dirty map is now in place");
        return Ok(true);
    }
    if !host_crash {
        return Ok(false);
    }
    if !missing {
        layout.move_to_lost_found(
            storage,
            &dirty,
            "dirty map damaged by a host crash; every block is compared instead",
        )?;
    }
    DirtyMap::create(storage, &dirty, NEVER_SHRUNK)?;
    Ok(true)
}

/// Accounts for every file in `volumes/` (see the module documentation). Returns the
/// deleted volumes whose files are now gone.
fn sweep_volumes_dir<S: Storage>(
    storage: &S,
    layout: &Layout,
    ns: &Namespace,
    volumes: &HashMap<VolumeId, VolumeSlot<S>>,
) -> FsResult<Vec<VolumeId>> {
    let dir = layout.volumes_dir();
    let deleted = ns.deleted_volumes()?;
    let next_id = ns.next_id(NEXT_VOLUME_ID)?;
    let mut removed = BTreeSet::new();
    for name in storage
        .list_dir(&dir)
        .map_err(io_error(format!("listing {}", dir.display())))?
    {
        let path = dir.join(&name);
        let verdict = classify(storage, &path, &name, volumes, &deleted, next_id);
        match verdict {
            Verdict::Keep => {}
            Verdict::Remove(why) => {
                info!("removing {}: {why}", path.display());
                storage
                    .remove_file(&path)
                    .map_err(io_error(format!("removing {}", path.display())))?;
                if let Some((id, _)) = parse_volume_file(&name)
                    && deleted.contains(&id)
                {
                    removed.insert(id);
                }
            }
            Verdict::LostFound(why) => {
                layout
                    .move_to_lost_found(storage, &path, why)
                    .map_err(io_error(format!("moving {}", path.display())))?;
            }
        }
    }
    storage
        .sync_dir(&dir)
        .map_err(io_error(format!("syncing {}", dir.display())))?;
    Ok(removed.into_iter().collect())
}

enum Verdict {
    Keep,
    Remove(&'static str),
    LostFound(&'static str),
}

fn classify<S: Storage>(
    storage: &S,
    path: &Path,
    name: &std::ffi::OsStr,
    volumes: &HashMap<VolumeId, VolumeSlot<S>>,
    deleted: &BTreeSet<VolumeId>,
    next_id: u64,
) -> Verdict {
    // A temporary of `publish_file`: never renamed into place, so nothing refers to it.
    if let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".tmp"))
        && parse_volume_file(std::ffi::OsStr::new(stem)).is_some()
    {
        return Verdict::Remove("an unfinished temporary file");
    }
    let Some((id, kind)) = parse_volume_file(name) else {
        return Verdict::LostFound("not a volume file");
    };
    if volumes.contains_key(&id) {
        return match kind {
            // Both maps exist: the freeze that wrote the fresh one never used it.
            VolumeFile::DirtyNew => Verdict::Remove("an unused fresh dirty map"),
            VolumeFile::Data | VolumeFile::Dirty | VolumeFile::Present => Verdict::Keep,
        };
    }
    if deleted.contains(&id) {
        return Verdict::Remove("its volume's deletion was committed");
    }
    let empty = match kind {
        VolumeFile::Data => storage.file_len(path).ok().flatten() == Some(0),
        VolumeFile::Dirty | VolumeFile::DirtyNew | VolumeFile::Present => {
            DirtyMap::open(storage, path).is_ok_and(|m| m.count() == 0)
        }
    };
    if id.0 >= next_id && empty {
        return Verdict::Remove("its volume's creation never committed");
    }
    Verdict::LostFound("it belongs to no volume")
}

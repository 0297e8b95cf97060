//! Reference-model test of the whole core, in-process: no FUSE, no root.
//!
//! proptest generates sequences of what users and crashes do — create volumes,
//! write, truncate, punch holes, fsync, `mkdir` snapshots, let captures run, `rmdir`,
//! read images (also through handles opened before the `rmdir`), delete volumes —
//! interleaved with crashes of the process (`kill -9`: everything written survives)
//! or of the host (power loss: only what was synced survives) at any storage
//! operation, and restarts. The core runs on [`MemStorage`] with manual scheduling,
//! so every run is deterministic and a failure shrinks to a short printed sequence.
//!
//! The model holds each volume's bytes and each snapshot's point-in-time image and
//! checks DESIGN.md's guarantees after every step that can break them:
//! 1. point in time: a completed snapshot reads exactly the volume as it was at its
//!    `mkdir`, whatever was written after (captures run later, so writes between
//!    `mkdir` and the capture exercise copy-on-write);
//! 2. incremental: checked elsewhere (stored bytes); here, that an incremental
//!    snapshot still reads whole;
//! 3. independent: deleting any snapshot or volume leaves every other snapshot whole;
//! 4. durable: acknowledged writes survive a process crash, fsynced ones a power
//!    loss; `completed` survives both; a capture cut off ends `completed` (exact) or
//!    `error`, and the next snapshot still holds every change;
//! 5. verified: reads never return wrong bytes (a mismatch is an error here);
//! 7. nothing destroyed: every restart opens the data directory.
//!
//! `EBSFS_MODEL_CASES` sets the number of cases (default 96: about 20 s).

mod core_support;

use std::collections::BTreeMap;
use std::ffi::OsStr;

use core_support::{CoreOps, root};
use ebsfs::config::Settings;
use ebsfs::fs::inode::{RECYCLE_BIN_DIR, SNAPSHOTS_DIR, VOLUMES_DIR};
use ebsfs::fs::{FsCore, SetAttr};
use ebsfs::namespace::Timestamp;
use ebsfs::storage::memory::{CrashMode, MemStorage};
use proptest::prelude::*;

const PAGE: usize = 4096;
const MAX_VOLUME: u64 = 256 << 10;
const VOLUMES: u8 = 3;

#[derive(Clone, Debug)]
enum Op {
    CreateVolume(u8),
    Write {
        v: u8,
        offset: u32,
        len: u16,
        seed: u8,
    },
    Truncate {
        v: u8,
        size: u32,
    },
    Punch {
        v: u8,
        offset: u32,
        len: u32,
    },
    Fsync(u8),
    Snapshot(u8),
    RunCaptures,
    DeleteSnapshot(prop::sample::Index),
    DeleteVolume(u8),
    OpenImage(prop::sample::Index),
    ReadOpenImages,
    CloseImage(prop::sample::Index),
    /// The `n`-th storage operation from now crashes the process or the host.
    ArmCrash {
        after: u16,
        power_loss: bool,
    },
    /// Crash now (kill -9 or power loss) and restart.
    CrashNow {
        power_loss: bool,
    },
    CleanRestart,
    /// `cp` of a completed snapshot's image into a new volume (a copy by reference),
    /// in `copy_file_range` requests of at most `piece` bytes (0: all that is left),
    /// as the kernel cuts a long copy.
    CloneVolume {
        snap: prop::sample::Index,
        v: u8,
        piece: u32,
    },
    /// Hydration of volumes made from snapshots, to the end.
    Hydrate,
    /// `mv recycle-bin/<s> snapshots/` (with the recycle bin on).
    RestoreSnapshot(prop::sample::Index),
    /// The recycle bin's period is over for all it holds: the daemon purges it.
    PurgeDue,
}

fn op() -> impl Strategy<Value = Op> {
    let v = 0..VOLUMES;
    prop_oneof![
        2 => v.clone().prop_map(Op::CreateVolume),
        8 => (v.clone(), 0..MAX_VOLUME as u32 - 1, 1u16..20_000, any::<u8>())
            .prop_map(|(v, offset, len, seed)| Op::Write { v, offset, len, seed }),
        2 => (v.clone(), 0..MAX_VOLUME as u32).prop_map(|(v, size)| Op::Truncate { v, size }),
        2 => (v.clone(), 0..MAX_VOLUME as u32, 1..64u32 << 10)
            .prop_map(|(v, offset, len)| Op::Punch { v, offset, len }),
        2 => v.clone().prop_map(Op::Fsync),
        5 => v.clone().prop_map(Op::Snapshot),
        4 => Just(Op::RunCaptures),
        2 => any::<prop::sample::Index>().prop_map(Op::DeleteSnapshot),
        1 => v.prop_map(Op::DeleteVolume),
        1 => any::<prop::sample::Index>().prop_map(Op::OpenImage),
        1 => Just(Op::ReadOpenImages),
        1 => any::<prop::sample::Index>().prop_map(Op::CloseImage),
        2 => (1u16..400, any::<bool>()).prop_map(|(after, power_loss)| Op::ArmCrash { after, power_loss }),
        1 => any::<bool>().prop_map(|power_loss| Op::CrashNow { power_loss }),
        1 => Just(Op::CleanRestart),
        2 => (any::<prop::sample::Index>(), 0..VOLUMES, piece()).prop_map(|(snap, v, piece)| Op::CloneVolume { snap, v, piece }),
        1 => Just(Op::Hydrate),
    ]
}

/// The `piece` of a copy that skips holes: one request per run of data.
const RUNS: u32 = u32::MAX;

/// The longest `copy_file_range` request of a copy: mostly all of it, else a few
/// blocks less 4 KiB (each request then shares whole blocks and leaves the rest to
/// the next, as with the kernel's 4 GiB − 4 KiB), or any length; or [`RUNS`].
fn piece() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => Just(0u32),
        2 => Just(RUNS),
        2 => (1u32..6).prop_map(|blocks| blocks * (16 << 10) - 4096),
        1 => 1..MAX_VOLUME as u32,
    ]
}

fn pattern(len: usize, seed: u8, offset: u32) -> Vec<u8> {
    let mut state =
        (u64::from(seed) << 32 | u64::from(offset)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A volume as the model knows it.
#[derive(Clone, Debug, Default)]
struct VolumeModel {
    bytes: Vec<u8>,
    /// Its deletion failed in a crash: it may be gone.
    deleting: bool,
    /// Since the last fsync: every version of each page and every length it had, one
    /// of which a power loss may leave.
    page_versions: BTreeMap<usize, Vec<Vec<u8>>>,
    len_versions: Vec<usize>,
    /// An operation a crash cut short may have happened, in part: each page it
    /// touches may hold its old or its new contents.
    maybe_pages: BTreeMap<usize, Vec<Vec<u8>>>,
    maybe_lens: Vec<usize>,
}

impl VolumeModel {
    fn page(&self, p: usize) -> Vec<u8> {
        let mut page = vec![0u8; PAGE];
        let start = p * PAGE;
        if start < self.bytes.len() {
            let end = self.bytes.len().min(start + PAGE);
            page[..end - start].copy_from_slice(&self.bytes[start..end]);
        }
        page
    }

    /// Applies `change` to the bytes, remembering the versions of pages `pages`.
    fn change(&mut self, pages: std::ops::Range<usize>, change: impl FnOnce(&mut Vec<u8>)) {
        let touched: Vec<usize> = pages.collect();
        for &p in &touched {
            if !self.page_versions.contains_key(&p) {
                let before = self.page(p);
                self.page_versions.insert(p, vec![before]);
            }
        }
        if self.len_versions.is_empty() {
            self.len_versions.push(self.bytes.len());
        }
        change(&mut self.bytes);
        for &p in &touched {
            let after = self.page(p);
            self.page_versions
                .get_mut(&p)
                .expect("recorded")
                .push(after);
        }
        self.len_versions.push(self.bytes.len());
    }

    fn synced(&mut self) {
        self.page_versions.clear();
        self.len_versions.clear();
    }

    /// Records what `change` would make of the pages `pages`, without applying it:
    /// the operation failed in a crash, perhaps after doing part of its work.
    fn maybe_changed(&mut self, pages: std::ops::Range<usize>, change: impl FnOnce(&mut Vec<u8>)) {
        let mut after = self.clone();
        change(&mut after.bytes);
        for p in pages {
            self.maybe_pages.entry(p).or_default().push(after.page(p));
        }
        self.maybe_lens.push(after.bytes.len());
    }

    /// After a restart: `actual` must be made of versions the model allows — the
    /// current ones, the pages an operation cut short may have changed, and after a
    /// power loss (`unsynced`) any version written since the last fsync.
    fn accept_restart(&mut self, name: &str, actual: Vec<u8>, unsynced: bool) {
        let len_ok = actual.len() == self.bytes.len()
            || self.maybe_lens.contains(&actual.len())
            || (unsynced && self.len_versions.contains(&actual.len()));
        assert!(
            len_ok,
            "{name}: length {} after a restart, model allows {} or {:?} / {:?}",
            actual.len(),
            self.bytes.len(),
            self.maybe_lens,
            self.len_versions
        );
        for p in 0..actual.len().div_ceil(PAGE) {
            let start = p * PAGE;
            let end = actual.len().min(start + PAGE);
            let got = &actual[start..end];
            let current = self.page(p);
            let maybe = self.maybe_pages.get(&p).into_iter().flatten();
            let written = self
                .page_versions
                .get(&p)
                .into_iter()
                .flatten()
                .filter(|_| unsynced);
            let allowed = std::iter::once(&current)
                .chain(maybe)
                .chain(written)
                .any(|v| &v[..end - start] == got);
            assert!(
                allowed,
                "{name}: page {p} after a restart (power loss: {unsynced}) matches no version the model allows"
            );
        }
        self.bytes = actual;
        self.maybe_pages.clear();
        self.maybe_lens.clear();
        if unsynced {
            self.synced();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SnapState {
    Pending,
    Completed,
    Error,
    /// Its `mkdir` failed in a crash: it may exist (and then ends in error) or not.
    Unsure,
}

#[derive(Clone, Debug)]
struct SnapModel {
    name: String,
    volume: String,
    image: Vec<u8>,
    state: SnapState,
    /// Its `rmdir` failed in a crash: it may be gone.
    deleting: bool,
    /// Its volume was deleted (or a crash cut the deletion short) while it was
    /// pending: its capture cannot resume after a crash.
    volume_deleted: bool,
    /// In the recycle bin.
    binned: bool,
    /// A move into or out of the bin failed in a crash: it may be in either place.
    moving: bool,
}

struct Harness {
    storage: MemStorage,
    settings: Settings,
    core: Option<FsCore<MemStorage>>,
    volumes: BTreeMap<String, VolumeModel>,
    snapshots: Vec<SnapModel>,
    /// Open images: (snapshot name, file handle, expected bytes).
    open_images: Vec<(String, u64, Vec<u8>)>,
    armed: Option<CrashMode>,
    next_label: u32,
    /// Copies of snapshots into volumes that a crash cut short: the volume may hold
    /// any first part of the image (the requests done), or none.
    clone_attempts: BTreeMap<String, Vec<u8>>,
}

impl CoreOps for Harness {
    fn core(&self) -> &FsCore<MemStorage> {
        self.core.as_ref().expect("core running")
    }
}

impl Harness {
    /// A new data directory; with `bin`, a recycle bin of an hour.
    fn new(bin: bool) -> Harness {
        let mut settings = core_support::settings();
        settings.max_volume_size_bytes = MAX_VOLUME;
        settings.recycle_bin_secs = bin.then_some(3600);
        let storage = MemStorage::new();
        let core = core_support::start(&storage, &settings).expect("a new data directory opens");
        Harness {
            storage,
            settings,
            core: Some(core),
            volumes: BTreeMap::new(),
            snapshots: Vec::new(),
            open_images: Vec::new(),
            armed: None,
            next_label: 0,
            clone_attempts: BTreeMap::new(),
        }
    }

    /// Runs one op. Returns whether the storage crashed during it.
    fn apply(&mut self, op: &Op) -> bool {
        match op {
            Op::ArmCrash { after, power_loss } => {
                if self.armed.is_none() {
                    self.storage.crash_after(u64::from(*after));
                    self.armed = Some(if *power_loss {
                        CrashMode::PowerLoss
                    } else {
                        CrashMode::Process
                    });
                }
                false
            }
            Op::CrashNow { power_loss } => {
                self.storage.crash();
                self.armed = Some(if *power_loss {
                    CrashMode::PowerLoss
                } else {
                    CrashMode::Process
                });
                true
            }
            Op::CleanRestart => {
                self.core().shutdown();
                if self.storage.has_crashed() {
                    return true;
                }
                self.restart(None);
                false
            }
            _ => self.apply_user_op(op),
        }
    }

    fn apply_user_op(&mut self, op: &Op) -> bool {
        let name = |v: &u8| format!("v{v}");
        let result: Result<(), String> = match op {
            Op::CreateVolume(v) => {
                let v = name(v);
                let exists = self.volumes.contains_key(&v);
                match self.core().create_volume(
                    VOLUMES_DIR,
                    OsStr::new(&format!("{v}.img")),
                    0o644,
                    &root(),
                    true,
                ) {
                    Ok(_) => {
                        assert!(!exists, "created {v} twice");
                        self.volumes.insert(v, VolumeModel::default());
                        Ok(())
                    }
                    Err(e) if exists && e.errno() == libc::EEXIST => Ok(()),
                    Err(e) => Err(format!("create {v}: {e}")),
                }
            }
            Op::Write {
                v,
                offset,
                len,
                seed,
            } => {
                let v = name(v);
                let Some(ino) = self.volume_ino(&v) else {
                    return self.gone(&v);
                };
                let data = pattern(usize::from(*len), *seed, *offset);
                let end = (*offset as u64 + data.len() as u64).min(MAX_VOLUME) as usize;
                let data = &data[..end - *offset as usize];
                let (fh, _) = match self.core().open(ino, true) {
                    Ok(h) => h,
                    Err(e) => return self.failed(&format!("open {v}: {e}")),
                };
                let result = self.core().write(ino, fh, u64::from(*offset), data);
                self.core().release(fh);
                let start = *offset as usize;
                let pages = start / PAGE..end.div_ceil(PAGE);
                let change = |bytes: &mut Vec<u8>| {
                    if bytes.len() < end {
                        bytes.resize(end, 0);
                    }
                    bytes[start..end].copy_from_slice(data);
                };
                self.record(&v, result.map(|_| ()), pages, change)
                    .map_err(|e| format!("write {v}: {e}"))
            }
            Op::Truncate { v, size } => {
                let v = name(v);
                let Some(ino) = self.volume_ino(&v) else {
                    return self.gone(&v);
                };
                let changes = SetAttr {
                    size: Some(u64::from(*size)),
                    ..SetAttr::default()
                };
                let result = self.core().setattr(ino, changes, &root()).map(|_| ());
                let (old, new) = (self.volumes[&v].bytes.len(), *size as usize);
                let pages = old.min(new) / PAGE..old.max(new).div_ceil(PAGE);
                self.record(&v, result, pages, |bytes| bytes.resize(new, 0))
                    .map_err(|e| format!("truncate {v}: {e}"))
            }
            Op::Punch { v, offset, len } => {
                let v = name(v);
                let Some(ino) = self.volume_ino(&v) else {
                    return self.gone(&v);
                };
                let (fh, _) = match self.core().open(ino, true) {
                    Ok(h) => h,
                    Err(e) => return self.failed(&format!("open {v}: {e}")),
                };
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let result =
                    self.core()
                        .fallocate(ino, fh, u64::from(*offset), u64::from(*len), mode);
                self.core().release(fh);
                let size = self.volumes[&v].bytes.len();
                let start = (*offset as usize).min(size);
                let end = (*offset as usize + *len as usize).min(size);
                let pages = start / PAGE..end.div_ceil(PAGE).max(start / PAGE);
                self.record(&v, result, pages, |bytes| bytes[start..end].fill(0))
                    .map_err(|e| format!("punch {v}: {e}"))
            }
            Op::Fsync(v) => {
                let v = name(v);
                let Some(ino) = self.volume_ino(&v) else {
                    return self.gone(&v);
                };
                let (fh, _) = match self.core().open(ino, true) {
                    Ok(h) => h,
                    Err(e) => return self.failed(&format!("open {v}: {e}")),
                };
                let result = self.core().fsync(ino, fh, false);
                self.core().release(fh);
                match result {
                    Ok(()) => {
                        self.volumes.get_mut(&v).expect("model volume").synced();
                        Ok(())
                    }
                    Err(e) => Err(format!("fsync {v}: {e}")),
                }
            }
            Op::Snapshot(v) => {
                let v = name(v);
                self.next_label += 1;
                let snap = format!("{v}@s{}", self.next_label);
                let busy = self
                    .snapshots
                    .iter()
                    .any(|s| s.volume == v && s.state == SnapState::Pending);
                match self.core().mkdir(SNAPSHOTS_DIR, OsStr::new(&snap), &root()) {
                    Ok(_) => {
                        let image = self
                            .volumes
                            .get(&v)
                            .expect("snapshot of a known volume")
                            .bytes
                            .clone();
                        self.snapshots.push(SnapModel {
                            name: snap,
                            volume: v,
                            image,
                            state: SnapState::Pending,
                            deleting: false,
                            volume_deleted: false,
                            binned: false,
                            moving: false,
                        });
                        Ok(())
                    }
                    Err(e) if !self.volumes.contains_key(&v) && e.errno() == libc::ENOENT => Ok(()),
                    Err(e) if busy && e.errno() == libc::EBUSY => Ok(()),
                    Err(e) => {
                        if self.storage.has_crashed() {
                            let image = self
                                .volumes
                                .get(&v)
                                .map(|m| m.bytes.clone())
                                .unwrap_or_default();
                            self.snapshots.push(SnapModel {
                                name: snap.clone(),
                                volume: v,
                                image,
                                state: SnapState::Unsure,
                                deleting: false,
                                volume_deleted: false,
                                binned: false,
                                moving: false,
                            });
                        }
                        Err(format!("mkdir {snap}: {e}"))
                    }
                }
            }
            Op::RunCaptures => {
                // A pending image reads its point in time before its capture runs.
                for s in self
                    .snapshots
                    .iter()
                    .filter(|s| s.state == SnapState::Pending)
                {
                    match self.read_image(&s.name) {
                        Ok(got) => assert!(
                            got == s.image,
                            "pending snapshot {} reads wrong bytes",
                            s.name
                        ),
                        Err(_) if self.storage.has_crashed() => break,
                        Err(e) => panic!("read pending snapshot {}: {e}", s.name),
                    }
                }
                self.core().engine().run_queued();
                if !self.storage.has_crashed() {
                    for s in &mut self.snapshots {
                        if s.state == SnapState::Pending {
                            s.state = SnapState::Completed;
                        }
                    }
                    self.check_snapshots();
                }
                Ok(())
            }
            Op::DeleteSnapshot(pick) => {
                if self.snapshots.is_empty() {
                    return false;
                }
                let i = pick.index(self.snapshots.len());
                let snap = self.snapshots[i].name.clone();
                if self.snapshots[i].binned {
                    return self.purge(i);
                }
                match self.core().rmdir(SNAPSHOTS_DIR, OsStr::new(&snap), &root()) {
                    Ok(()) if self.to_bin(i) => {
                        self.snapshots[i].binned = true;
                        Ok(())
                    }
                    Ok(()) => {
                        self.snapshots.remove(i);
                        Ok(())
                    }
                    Err(e)
                        if self.snapshots[i].state == SnapState::Unsure
                            && e.errno() == libc::ENOENT =>
                    {
                        self.snapshots.remove(i);
                        Ok(())
                    }
                    Err(e) => {
                        let crashed = self.storage.has_crashed();
                        if self.to_bin(i) {
                            self.snapshots[i].moving = crashed;
                        } else {
                            self.snapshots[i].deleting = crashed;
                        }
                        Err(format!("rmdir {snap}: {e}"))
                    }
                }
            }
            Op::DeleteVolume(v) => {
                let v = name(v);
                match self
                    .core()
                    .unlink(VOLUMES_DIR, OsStr::new(&format!("{v}.img")))
                {
                    Ok(()) => {
                        assert!(
                            self.volumes.remove(&v).is_some(),
                            "deleted unknown volume {v}"
                        );
                        self.volume_deleted(&v);
                        Ok(())
                    }
                    Err(e) if !self.volumes.contains_key(&v) && e.errno() == libc::ENOENT => Ok(()),
                    Err(e) => {
                        if let Some(model) = self.volumes.get_mut(&v) {
                            model.deleting = self.storage.has_crashed();
                        }
                        if self.storage.has_crashed() {
                            self.volume_deleted(&v);
                        }
                        Err(format!("unlink {v}: {e}"))
                    }
                }
            }
            Op::OpenImage(pick) => {
                let completed: Vec<SnapModel> = self
                    .snapshots
                    .iter()
                    .filter(|s| s.state == SnapState::Completed && !s.binned)
                    .cloned()
                    .collect();
                if completed.is_empty() {
                    return false;
                }
                let s = &completed[pick.index(completed.len())];
                let ino = self
                    .snapshot_file(&s.name, "volume.img")
                    .expect("completed snapshot is visible");
                match self.core().open(ino, false) {
                    Ok((fh, _)) => {
                        self.open_images.push((s.name.clone(), fh, s.image.clone()));
                        Ok(())
                    }
                    Err(e) => Err(format!("open {}: {e}", s.name)),
                }
            }
            Op::ReadOpenImages => {
                for (name, fh, image) in &self.open_images {
                    // The handle needs no name: the snapshot may be deleted by now.
                    let got = self
                        .read_handle(0, *fh)
                        .unwrap_or_else(|e| panic!("read open image of {name}: {e}"));
                    assert!(got == *image, "open image of {name} reads wrong bytes");
                }
                Ok(())
            }
            Op::CloseImage(pick) => {
                if !self.open_images.is_empty() {
                    let (_, fh, _) = self.open_images.remove(pick.index(self.open_images.len()));
                    self.core().release(fh);
                }
                Ok(())
            }
            Op::CloneVolume { snap, v, piece } => return self.clone_volume(snap, &name(v), *piece),
            Op::Hydrate => self
                .core()
                .hydrate_all()
                .map_err(|e| format!("hydrate: {e}")),
            Op::RestoreSnapshot(pick) => {
                let binned: Vec<usize> = (0..self.snapshots.len())
                    .filter(|&i| self.snapshots[i].binned)
                    .collect();
                if binned.is_empty() {
                    return false;
                }
                let i = binned[pick.index(binned.len())];
                let snap = OsStr::new(&self.snapshots[i].name).to_owned();
                match self.core().rename(
                    RECYCLE_BIN_DIR,
                    &snap,
                    SNAPSHOTS_DIR,
                    &snap,
                    false,
                    &root(),
                ) {
                    Ok(()) => {
                        self.snapshots[i].binned = false;
                        Ok(())
                    }
                    Err(e) => {
                        self.snapshots[i].moving = self.storage.has_crashed();
                        Err(format!("restore {snap:?}: {e}"))
                    }
                }
            }
            Op::PurgeDue => {
                let later = Timestamp(Timestamp::now().0 + 7200 * 1_000_000_000);
                let pass = self.core().purge_recycle_bin(later);
                if self.storage.has_crashed() {
                    // Failures are logged, not returned: any of them may be gone.
                    for s in self.snapshots.iter_mut().filter(|s| s.binned) {
                        s.deleting = true;
                    }
                    return true;
                }
                let binned: Vec<String> = self
                    .snapshots
                    .iter()
                    .filter(|s| s.binned)
                    .map(|s| s.name.clone())
                    .collect();
                assert_eq!(pass.purged, binned, "everything in the bin is due");
                self.snapshots.retain(|s| !s.binned);
                Ok(())
            }
            Op::ArmCrash { .. } | Op::CrashNow { .. } | Op::CleanRestart => unreachable!(),
        };
        match result {
            Ok(()) => self.storage.has_crashed(),
            Err(why) => self.failed(&why),
        }
    }

    /// `cp snapshots/<s>/volume.img volumes/<v>.img` of a completed snapshot into a
    /// volume that does not exist yet. Returns whether the storage crashed.
    fn clone_volume(&mut self, pick: &prop::sample::Index, v: &str, piece: u32) -> bool {
        let completed: Vec<SnapModel> = self
            .snapshots
            .iter()
            .filter(|s| s.state == SnapState::Completed && !s.binned)
            .cloned()
            .collect();
        if completed.is_empty() || self.volumes.contains_key(v) {
            return false;
        }
        let source = &completed[pick.index(completed.len())];
        if let Err(e) = self.new_volume(v) {
            return self.failed(&format!("create {v}: {e}"));
        }
        self.volumes.insert(v.to_string(), VolumeModel::default());
        let image = source.image.clone();
        let result = self.copy_image(&source.name, v, image.len() as u64, piece);
        match result {
            Ok(()) => {
                if std::env::var_os("EBSFS_MODEL_TRACE").is_some() {
                    eprintln!("  {v} is a copy of {}", source.name);
                }
                let model = self.volumes.get_mut(v).expect("model volume");
                model.change(0..image.len().div_ceil(PAGE), |bytes| *bytes = image);
                false
            }
            Err(why) => {
                self.clone_attempts.insert(v.to_string(), image);
                self.failed(&why)
            }
        }
    }

    /// Copies a snapshot's image into a volume with `copy_file_range`, as `cp` does,
    /// in requests of at most `piece` bytes (0: no limit).
    fn copy_image(&self, snapshot: &str, v: &str, len: u64, piece: u32) -> Result<(), String> {
        let image = self
            .snapshot_file(snapshot, "volume.img")
            .ok_or_else(|| format!("snapshot {snapshot} is gone"))?;
        let volume = self
            .volume_ino(v)
            .ok_or_else(|| format!("volume {v} is gone"))?;
        let (fh_in, _) = self.core().open(image, false).map_err(|e| e.to_string())?;
        let (fh_out, _) = self.core().open(volume, true).map_err(|e| e.to_string())?;
        let copy = |start: u64, end: u64| -> Result<(), String> {
            let mut done = start;
            while done < end {
                let want = match piece {
                    0 | RUNS => end - done,
                    piece => (end - done).min(u64::from(piece)),
                };
                match self
                    .core()
                    .copy_range(fh_in, done, volume, fh_out, done, want)
                {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) => return Err(format!("copy {snapshot} into {v}: {e}")),
                }
            }
            Ok(())
        };
        let result = if piece == RUNS {
            self.copy_runs(image, fh_in, volume, len, copy)
        } else {
            copy(0, len)
        };
        self.core().release(fh_in);
        self.core().release(fh_out);
        result
    }

    /// A copy that skips holes: `copy` of each run of data `SEEK_DATA` and
    /// `SEEK_HOLE` find, in order, then the volume's size set to `len`.
    fn copy_runs(
        &self,
        image: u64,
        fh_in: u64,
        volume: u64,
        len: u64,
        copy: impl Fn(u64, u64) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut at = 0;
        while at < len {
            let data = match self.core().lseek(image, fh_in, at, libc::SEEK_DATA) {
                Ok(data) => data,
                Err(e) if e.errno() == libc::ENXIO => break,
                Err(e) => return Err(format!("SEEK_DATA: {e}")),
            };
            let hole = self
                .core()
                .lseek(image, fh_in, data, libc::SEEK_HOLE)
                .map_err(|e| format!("SEEK_HOLE: {e}"))?;
            copy(data, hole)?;
            at = hole;
        }
        let changes = SetAttr {
            size: Some(len),
            ..SetAttr::default()
        };
        self.core()
            .setattr(volume, changes, &root())
            .map(|_| ())
            .map_err(|e| format!("truncate: {e}"))
    }

    /// Takes in a volume operation's outcome: applied to the model when it succeeded;
    /// remembered as perhaps half done when a crash cut it short.
    fn record(
        &mut self,
        v: &str,
        result: Result<(), ebsfs::fs::FsError>,
        pages: std::ops::Range<usize>,
        change: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), String> {
        let crashed = self.storage.has_crashed();
        let model = self.volumes.get_mut(v).expect("model volume");
        match result {
            Ok(()) => {
                model.change(pages, change);
                Ok(())
            }
            Err(e) => {
                if crashed {
                    model.maybe_changed(pages, change);
                }
                Err(e.to_string())
            }
        }
    }

    /// An operation failed: fine if the storage crashed under it, a bug otherwise.
    fn failed(&mut self, why: &str) -> bool {
        assert!(self.storage.has_crashed(), "failed without a crash: {why}");
        true
    }

    /// A volume the model has is gone from the core.
    fn gone(&mut self, v: &str) -> bool {
        assert!(
            !self.volumes.contains_key(v) || self.storage.has_crashed(),
            "volume {v} is gone"
        );
        self.storage.has_crashed()
    }

    /// Whether `rmdir` of snapshot `i` moves it to the recycle bin.
    fn to_bin(&self, i: usize) -> bool {
        self.settings.recycle_bin_secs.is_some() && self.snapshots[i].state == SnapState::Completed
    }

    /// `rmdir recycle-bin/<s>` of snapshot `i`, in the bin. Returns whether the
    /// storage crashed.
    fn purge(&mut self, i: usize) -> bool {
        let snap = self.snapshots[i].name.clone();
        match self
            .core()
            .rmdir(RECYCLE_BIN_DIR, OsStr::new(&snap), &root())
        {
            Ok(()) => {
                self.snapshots.remove(i);
                self.storage.has_crashed()
            }
            Err(e) => {
                self.snapshots[i].deleting = self.storage.has_crashed();
                self.failed(&format!("rmdir recycle-bin/{snap}: {e}"))
            }
        }
    }

    /// Whether snapshot `name` is in `recycle-bin/`.
    fn in_bin(&self, name: &str) -> bool {
        self.core()
            .lookup(RECYCLE_BIN_DIR, OsStr::new(name))
            .is_ok()
    }

    /// A snapshot's image, from `snapshots/` or `recycle-bin/`.
    fn image_of(&self, s: &SnapModel) -> Result<Vec<u8>, ebsfs::fs::FsError> {
        if !s.binned {
            return self.read_image(&s.name);
        }
        let dir = self.core().lookup(RECYCLE_BIN_DIR, OsStr::new(&s.name))?;
        let image = self.core().lookup(dir.ino, OsStr::new("volume.img"))?;
        self.read_file(image.ino)
    }

    /// Volume `v` is (or may be) deleted: its pending snapshots cannot resume.
    fn volume_deleted(&mut self, v: &str) {
        for s in self.snapshots.iter_mut().filter(|s| s.volume == v) {
            s.volume_deleted = true;
        }
    }

    /// Restarts after a crash in `mode` (or a clean stop: `None`) and checks everything.
    fn restart(&mut self, mode: Option<CrashMode>) {
        if let Some(core) = self.core.take() {
            if mode.is_none() {
                core.shutdown();
            }
            drop(core);
        }
        self.open_images.clear();
        self.storage = self.storage.restart(mode.unwrap_or(CrashMode::Process));
        self.armed = None;
        let core = core_support::start(&self.storage, &self.settings)
            .unwrap_or_else(|e| panic!("restart after {mode:?} fails: {e}"));
        self.core = Some(core);
        // Captures a crash interrupted resume (queued: manual scheduling).
        self.core().engine().run_queued();
        self.reconcile(mode);
    }

    /// Takes in what a crash may have decided either way, then checks every guarantee.
    fn reconcile(&mut self, mode: Option<CrashMode>) {
        let names: Vec<String> = self.volumes.keys().cloned().collect();
        for v in names {
            if self.volume_ino(&v).is_none() {
                // Only a deletion that a crash interrupted may have gone through.
                assert!(
                    self.volumes[&v].deleting,
                    "volume {v} vanished after {mode:?}"
                );
                self.volumes.remove(&v);
                continue;
            }
            self.volumes.get_mut(&v).expect("model volume").deleting = false;
            let actual = self
                .read_volume(&v)
                .unwrap_or_else(|e| panic!("read volume {v}: {e}"));
            if let Some(image) = self.clone_attempts.remove(&v)
                && image.starts_with(&actual)
            {
                // A copy a crash cut short: the requests done, or none.
                let model = self.volumes.get_mut(&v).expect("model volume");
                model.bytes = actual;
                model.synced();
                continue;
            }
            let model = self.volumes.get_mut(&v).expect("model volume");
            model.accept_restart(&v, actual, mode == Some(CrashMode::PowerLoss));
        }
        // Volumes the model does not have: a creation whose commit survived its crash.
        for v in (0..VOLUMES).map(|v| format!("v{v}")) {
            if !self.volumes.contains_key(&v) && self.volume_ino(&v).is_some() {
                let actual = self
                    .read_volume(&v)
                    .unwrap_or_else(|e| panic!("read volume {v}: {e}"));
                let copied = self.clone_attempts.remove(&v);
                assert!(
                    actual.is_empty() || copied.is_some_and(|image| image.starts_with(&actual)),
                    "unexpected volume {v} holds data"
                );
                self.volumes.insert(
                    v,
                    VolumeModel {
                        bytes: actual,
                        ..VolumeModel::default()
                    },
                );
            }
        }
        let mut kept = Vec::new();
        for mut s in std::mem::take(&mut self.snapshots) {
            let moving = std::mem::replace(&mut s.moving, false);
            if self.in_bin(&s.name) {
                assert!(
                    s.binned || moving,
                    "snapshot {} is in the bin after {mode:?}",
                    s.name
                );
                assert_eq!(s.state, SnapState::Completed, "{} in the bin", s.name);
                s.binned = true;
                s.deleting = false;
                kept.push(s);
                continue;
            }
            let status = self.status(&s.name);
            if status.is_none() && s.deleting {
                continue;
            }
            if s.binned {
                assert!(
                    moving && status.is_some(),
                    "snapshot {} left the bin after {mode:?}: {status:?}",
                    s.name
                );
                s.binned = false;
            }
            let deleting = std::mem::replace(&mut s.deleting, false);
            s.state = match (s.state, status.as_deref()) {
                (SnapState::Completed, Some("completed")) => SnapState::Completed,
                (SnapState::Completed, other) => {
                    panic!("completed snapshot {} is {other:?} after {mode:?}", s.name)
                }
                // A capture a kill interrupts resumes; one an rmdir was cancelling, one
                // whose volume was deleted, or one a power loss interrupted, may end in
                // error.
                (SnapState::Pending | SnapState::Unsure, Some("completed")) => SnapState::Completed,
                (SnapState::Pending, Some("error"))
                    if deleting || mode == Some(CrashMode::PowerLoss) || s.volume_deleted =>
                {
                    SnapState::Error
                }
                (SnapState::Unsure | SnapState::Error, Some("error")) => SnapState::Error,
                (SnapState::Unsure, None) => continue,
                (state, other) => panic!(
                    "snapshot {} ({state:?}) is {other:?} after {mode:?}",
                    s.name
                ),
            };
            kept.push(s);
        }
        self.snapshots = kept;
        self.check_snapshots();
    }

    /// Every completed snapshot reads back exactly its point-in-time image.
    fn check_snapshots(&self) {
        for s in self
            .snapshots
            .iter()
            .filter(|s| s.state == SnapState::Completed)
        {
            let got = self
                .image_of(s)
                .unwrap_or_else(|e| panic!("read snapshot {}: {e}", s.name));
            if got != s.image {
                let first = got.iter().zip(&s.image).position(|(a, b)| a != b);
                panic!(
                    "snapshot {} reads wrong bytes: {} bytes, expected {}, first difference at {first:?}",
                    s.name,
                    got.len(),
                    s.image.len()
                );
            }
        }
    }

    fn run(ops: &[Op]) {
        Harness::run_with(ops, false);
    }

    /// [`Harness::run`], with a recycle bin when `bin`.
    fn run_with(ops: &[Op], bin: bool) {
        let trace = std::env::var_os("EBSFS_MODEL_TRACE").is_some();
        if trace {
            eprintln!("--- case");
        }
        let mut h = Harness::new(bin);
        for op in ops {
            if trace {
                eprintln!("{op:?}");
            }
            if h.apply(op) {
                let mode = h.armed.unwrap_or(CrashMode::Process);
                h.restart(Some(mode));
            }
        }
        // The end, without crashes: captures run, a snapshot of every volume equals it.
        h.storage.disarm();
        if h.storage.has_crashed() {
            let mode = h.armed.unwrap_or(CrashMode::Process);
            h.restart(Some(mode));
        }
        h.apply(&Op::RunCaptures);
        let names: Vec<String> = h.volumes.keys().cloned().collect();
        for v in names {
            let before = h.snapshots.len();
            h.apply(&Op::Snapshot(v[1..].parse().expect("volume number")));
            h.apply(&Op::RunCaptures);
            assert_eq!(
                h.snapshots.len(),
                before + 1,
                "final snapshot of {v} not taken"
            );
            let last = h.snapshots.last().expect("final snapshot");
            let image = h.read_image(&last.name).expect("final snapshot");
            let volume = h.read_volume(&v).expect("volume");
            assert!(image == volume, "final snapshot of {v} differs from it");
        }
        h.restart(None);
    }
}

fn cases() -> u32 {
    std::env::var("EBSFS_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_core_keeps_every_guarantee_through_crashes(ops in prop::collection::vec(op(), 1..48)) {
        Harness::run(&ops);
    }

    /// The same, from a volume with data and a completed snapshot, with copies of
    /// snapshots into volumes (and hydration) among the likely operations.
    #[test]
    fn volumes_from_snapshots_keep_every_guarantee(
        seed in any::<u8>(),
        ops in prop::collection::vec(prop_oneof![3 => op(), 1 => copy_op()], 1..48),
    ) {
        let mut all = vec![
            Op::CreateVolume(0),
            Op::Write { v: 0, offset: 0, len: 60_000, seed },
            Op::Snapshot(0),
            Op::RunCaptures,
        ];
        all.extend(ops);
        Harness::run(&all);
    }

    /// The same with a recycle bin: snapshots go into it, come back, are purged,
    /// with crashes anywhere among them.
    #[test]
    fn the_recycle_bin_keeps_every_guarantee_through_crashes(
        ops in prop::collection::vec(prop_oneof![3 => op(), 2 => bin_op()], 1..48),
    ) {
        Harness::run_with(&ops, true);
    }
}

/// With the recycle bin on: deletions (into the bin, or purges of what is in it),
/// restores and purges when the period is over.
fn bin_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<prop::sample::Index>().prop_map(Op::DeleteSnapshot),
        3 => any::<prop::sample::Index>().prop_map(Op::RestoreSnapshot),
        1 => Just(Op::PurgeDue),
    ]
}

fn copy_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<prop::sample::Index>(), 0..VOLUMES, piece()).prop_map(|(snap, v, piece)| Op::CloneVolume { snap, v, piece }),
        1 => Just(Op::Hydrate),
    ]
}

//! Other hosts' snapshots in the mount: `snapshots/<volume>@<label>@<host>/`, read
//! from the bucket, and volumes made from them.
//!
//! They read like local snapshots (the same files, the same sharing through their
//! owner, mode and ACL as their host last wrote them) but only their host changes
//! or deletes them: `rmdir`, `chmod`, `setfacl` and `setfattr` fail with `EPERM`.
//! An open `volume.img` (a loop device, a `cp`) lists the snapshot's root in this
//! host's lease until it closes, so a deletion on its host does not take the data
//! from under it.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use log::info;

use super::clones::{ImageShape, blank_copy_target};
use super::{FsCore, FsError, FsResult};
use crate::layout::VolumeFile;
use crate::namespace::{RemoteParent, SnapshotId, SnapshotRecord};
use crate::remote::catalog::{FOREIGN_IDS, Foreign};
use crate::remote::reader::{self, RemoteBlocks};
use crate::snapshot::upload::Uploader;
use crate::storage::Storage;
use crate::volume::Volume;
use crate::volume::dirty::DirtyMap;
use crate::volume::source::{SnapshotBlocks, Source};

/// An open `volume.img` of a snapshot in the bucket.
pub struct RemoteImage {
    pub blocks: Arc<RemoteBlocks>,
    pub name: String,
    /// The snapshot as listed when it was opened.
    pub record: SnapshotRecord,
    uploader: Arc<Uploader>,
    extents: OnceLock<Vec<Range<u64>>>,
}

impl Drop for RemoteImage {
    fn drop(&mut self) {
        self.uploader.end_reading(&self.blocks.root_name);
    }
}

impl RemoteImage {
    pub fn read(&self, buf: &mut [u8], offset: u64) -> FsResult<usize> {
        reader::read_at(&self.blocks, buf, offset).map_err(|e| FsError::Io {
            what: format!("reading snapshot {}", self.name),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// `SEEK_DATA` / `SEEK_HOLE`, as for a local snapshot image.
    pub fn seek(&self, offset: u64, data: bool) -> FsResult<Option<u64>> {
        let size = self.blocks.size_bytes();
        if offset >= size {
            return Ok(None);
        }
        let bs = u64::from(self.blocks.root.facts.block_size);
        let extents = match self.extents.get() {
            Some(extents) => extents,
            None => {
                let blocks =
                    self.blocks
                        .data_blocks(0..size.div_ceil(bs))
                        .map_err(|e| FsError::Io {
                            what: format!("listing snapshot {}", self.name),
                            source: e,
                        })?;
                let mut runs: Vec<Range<u64>> = Vec::new();
                for block in blocks {
                    match runs.last_mut() {
                        Some(run) if run.end == block => run.end += 1,
                        _ => runs.push(block..block + 1),
                    }
                }
                self.extents.get_or_init(|| runs)
            }
        };
        let block = offset / bs;
        let at = extents.partition_point(|run| run.end <= block);
        let run = extents.get(at);
        Ok(Some(match (data, run) {
            (true, Some(run)) => (run.start * bs).max(offset),
            (true, None) => return Ok(None),
            (false, Some(run)) if run.start <= block => (run.end * bs).min(size),
            (false, _) => offset,
        }))
    }
}

pub fn is_foreign(id: SnapshotId) -> bool {
    id.0 >= FOREIGN_IDS
}

impl<S: Storage> FsCore<S> {
    pub(super) fn uploader(&self) -> Option<&Arc<Uploader>> {
        self.engine.uploader()
    }

    /// Another host's snapshot, by id.
    pub(super) fn foreign(&self, id: SnapshotId) -> Option<Arc<Foreign>> {
        self.uploader()?.catalog.get(id)
    }

    pub(super) fn foreign_by_name(&self, name: &str) -> Option<Arc<Foreign>> {
        self.uploader()?.catalog.by_name(name)
    }

    pub(super) fn foreign_list(&self) -> Vec<Arc<Foreign>> {
        self.uploader()
            .map(|up| up.catalog.list())
            .unwrap_or_default()
    }

    /// Refuses a change to another host's snapshot.
    pub(super) fn refuse_foreign(&self, id: SnapshotId, change: &str) -> FsResult<()> {
        match self.foreign(id) {
            Some(f) => Err(FsError::NotPermitted(format!(
                "snapshot {}: it belongs to host {}; only that host may {change} it",
                f.name,
                f.host()
            ))),
            None => Ok(()),
        }
    }

    /// Opens another host's snapshot image, protected by this host's lease.
    pub(super) fn open_remote_image(&self, id: SnapshotId) -> FsResult<RemoteImage> {
        let foreign = self
            .foreign(id)
            .ok_or_else(|| FsError::NotFound(format!("snapshot {id}")))?;
        let up = self
            .uploader()
            .expect("foreign snapshots come from the store")
            .clone();
        up.begin_reading(&self.ns.view(), &foreign.root_name)?;
        Ok(RemoteImage {
            blocks: Arc::new(RemoteBlocks::with_root(
                up.store.clone(),
                &foreign.root_name,
                foreign.root.clone(),
            )),
            name: foreign.name.clone(),
            record: foreign.record(),
            uploader: up,
            extents: OnceLock::new(),
        })
    }

    /// Makes `volume` a copy of another host's snapshot by reference, or shares more
    /// of it, as `share_blocks` does for local snapshots: its blocks read from the
    /// bucket until hydrated. `None`: copy bytes instead.
    pub(super) fn share_remote_blocks(
        &self,
        volume: &Arc<Volume<S>>,
        image: &RemoteImage,
        offset: u64,
        len: u64,
    ) -> FsResult<Option<u64>> {
        let end = offset.saturating_add(len).min(image.blocks.size_bytes());
        if offset >= end {
            return Ok(Some(0));
        }
        // Listed in the lease from before the volume reads it (the volume's record
        // keeps it there after); fails if the snapshot was deleted meanwhile.
        let up = self
            .uploader()
            .expect("remote images come from the store")
            .clone();
        up.begin_reading(&self.ns.view(), &image.blocks.root_name)?;
        let shared = self.share_remote_locked(volume, image, offset, end);
        up.end_reading(&image.blocks.root_name);
        shared
    }

    fn share_remote_locked(
        &self,
        volume: &Arc<Volume<S>>,
        image: &RemoteImage,
        offset: u64,
        end: u64,
    ) -> FsResult<Option<u64>> {
        let next_data = |at| image.seek(at, true);
        let shape = ImageShape {
            size: image.blocks.size_bytes(),
            block_size: u64::from(image.blocks.root.facts.block_size),
            next_data: &next_data,
        };
        let bs = shape.block_size;
        let guard = self.ns.lock();
        let view = self.ns.view();
        let Some(record) = view.volumes.get(&volume.id).cloned() else {
            return Ok(None);
        };
        let end = match view.remote_parents.get(&volume.id) {
            Some(parent) if parent.root == image.blocks.root_name => {
                // Its captures compare every block (no local base).
                let shared =
                    self.share_more(&guard, volume, &record, &shape, (offset, end), false)?;
                let Some(end) = shared else {
                    return Ok(None);
                };
                end
            }
            Some(_) => return Ok(None),
            None => {
                if !blank_copy_target(&view, &record, bs as u32) {
                    return Ok(None);
                }
                let Some(end) = shape.first_share(offset, end)? else {
                    return Ok(None);
                };
                let present_path = self.layout.volume_file(volume.id, VolumeFile::Present);
                let made = DirtyMap::create(&self.storage, &present_path, end)
                    .map_err(super::io_error(format!(
                        "creating {}",
                        present_path.display()
                    )))
                    .and_then(|present| {
                        let blocks: Arc<dyn SnapshotBlocks> = image.blocks.clone();
                        let source = Source::new(blocks, present, bs);
                        volume.become_copy_of(source, || {
                            self.ns.change(&guard, |c| -> FsResult<()> {
                                c.put_remote_parent(
                                    volume.id,
                                    RemoteParent {
                                        root: image.blocks.root_name.clone(),
                                        name: image.name.clone(),
                                    },
                                )?;
                                let mut record = record.clone();
                                // Its first capture compares every block: it has no
                                // local base.
                                record.full_compare = true;
                                record.high_water_bytes = u64::MAX;
                                record.hydrated = false;
                                Ok(c.put_volume(record)?)
                            })
                        })
                    });
                if !made? {
                    return Ok(None);
                }
                info!(
                    "volume {} is now a copy of snapshot {} from the bucket ({end} of its \
                     {} bytes so far, nothing copied)",
                    record.name, image.name, shape.size
                );
                end
            }
        };
        drop(guard);
        self.shared(volume, offset, end)
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::sync::Arc;

    use object_store::memory::InMemory;

    use super::super::inode::{Node, SNAPSHOTS_DIR, SnapshotFile, VOLUMES_DIR};
    use super::super::{Caller, FsCore, SetAttr};
    use crate::config::Settings;
    use crate::remote::test_support::{self, Faulty};
    use crate::snapshot::Scheduling;
    use crate::storage::memory::MemStorage;

    const BLOCK: usize = 65536;

    fn root() -> Caller {
        Caller::with_groups(0, 0, vec![0])
    }

    struct Host {
        core: FsCore<MemStorage>,
        storage: MemStorage,
        bucket: Arc<Faulty>,
    }

    fn host(bucket: &Arc<InMemory>, id: &str) -> Host {
        let storage = MemStorage::new();
        start(bucket, id, storage)
    }

    fn start(bucket: &Arc<InMemory>, id: &str, storage: MemStorage) -> Host {
        let mut settings = Settings::embedded();
        settings.data_dir = "/data".into();
        settings.host_id = id.to_string();
        let faulty = Faulty::new(bucket.clone());
        let remote = Arc::new(test_support::faulty_store(&faulty, id).unwrap());
        // Small packs, so that a few blocks make several.
        remote
            .pack_bytes
            .store(2 * BLOCK, std::sync::atomic::Ordering::Relaxed);
        let core = FsCore::start_with_store(
            settings,
            storage.clone(),
            Scheduling::Manual,
            Some(remote.clone()),
        )
        .unwrap();
        Host {
            core,
            storage,
            bucket: faulty,
        }
    }

    impl Host {
        fn volume(&self, name: &str, data: &[(u64, u8, usize)]) -> u64 {
            let attr = self
                .core
                .create_volume(
                    VOLUMES_DIR,
                    OsStr::new(&format!("{name}.img")),
                    0o600,
                    &root(),
                    true,
                )
                .unwrap();
            let (fh, _) = self.core.open(attr.ino, true).unwrap();
            for &(offset, byte, len) in data {
                self.core
                    .write(attr.ino, fh, offset, &vec![byte; len])
                    .unwrap();
            }
            self.core.release(fh);
            attr.ino
        }

        fn write(&self, ino: u64, offset: u64, data: &[u8]) {
            let (fh, _) = self.core.open(ino, true).unwrap();
            self.core.write(ino, fh, offset, data).unwrap();
            self.core.release(fh);
        }

        /// Takes snapshot `name` and runs its capture (not its upload).
        fn snapshot(&self, name: &str) -> u64 {
            let ino = self
                .core
                .mkdir(SNAPSHOTS_DIR, OsStr::new(name), &root())
                .unwrap()
                .ino;
            self.core.engine().run_queued();
            ino
        }

        fn text(&self, dir: u64, file: SnapshotFile) -> String {
            let Some(Node::SnapshotDir(id)) = Node::from_ino(dir) else {
                panic!("not a snapshot directory");
            };
            let ino = Node::SnapshotFile(id, file).ino();
            let (fh, _) = self.core.open(ino, false).unwrap();
            let mut buf = vec![0; 4096];
            let n = self.core.read(ino, fh, 0, &mut buf).unwrap();
            self.core.release(fh);
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }

        fn status(&self, dir: u64) -> String {
            self.text(dir, SnapshotFile::Status).trim().to_string()
        }

        fn read_all(&self, ino: u64, len: usize) -> Vec<u8> {
            let (fh, _) = self.core.open(ino, false).unwrap();
            let mut buf = vec![0; len];
            let mut at = 0;
            while at < len {
                let n = self.core.read(ino, fh, at as u64, &mut buf[at..]).unwrap();
                if n == 0 {
                    break;
                }
                at += n;
            }
            self.core.release(fh);
            buf.truncate(at);
            buf
        }

        fn image(&self, name: &str) -> u64 {
            let dir = self
                .core
                .lookup(SNAPSHOTS_DIR, OsStr::new(name))
                .unwrap()
                .ino;
            self.core.lookup(dir, OsStr::new("volume.img")).unwrap().ino
        }

        /// Copies snapshot image `snapshot` into new volume `name` the way `cp` does.
        fn clone_from(&self, snapshot: &str, name: &str, len: u64) -> u64 {
            let image = self.image(snapshot);
            let (fh_in, _) = self.core.open(image, false).unwrap();
            let vol = self.volume(name, &[]);
            let (fh_out, _) = self.core.open(vol, true).unwrap();
            let mut done = 0;
            while done < len {
                let n = self
                    .core
                    .copy_range(fh_in, done, vol, fh_out, done, len - done)
                    .unwrap();
                assert!(n > 0);
                done += n;
            }
            self.core.release(fh_in);
            self.core.release(fh_out);
            vol
        }

        fn uploaded(&self) -> u64 {
            self.core
                .engine()
                .uploader()
                .unwrap()
                .uploaded_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    /// Distinct contents per block, so that dedup cannot hide a wrong block.
    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| seed ^ (i / 4096) as u8 ^ (i % 251) as u8)
            .collect()
    }

    #[test]
    fn a_snapshot_completes_only_in_the_bucket_and_other_hosts_read_and_clone_it() {
        let bucket = Arc::new(InMemory::new());
        let a = host(&bucket, "hosta");
        let b = host(&bucket, "hostb");
        let vol = a.volume("db", &[]);
        let data = pattern(7, 40 * BLOCK);
        a.write(vol, 3 * BLOCK as u64, &data);
        let snap = a.snapshot("db@one");
        assert_eq!(a.status(snap), "pending", "captured, not uploaded yet");
        assert!(
            a.text(snap, SnapshotFile::Info)
                .contains("location = \"local\"")
        );
        assert_eq!(a.core.engine().run_remote_work(), 1);
        assert_eq!(a.status(snap), "completed");
        let info = a.text(snap, SnapshotFile::Info);
        assert!(
            info.contains("host = \"hosta\"") && info.contains("local+bucket"),
            "{info}"
        );
        assert!(a.uploaded() > 0);

        // Host b sees it under a name that says whose it is, and reads it.
        assert_eq!(b.core.engine().refresh_catalog().unwrap(), 1);
        let names: Vec<String> = b
            .core
            .readdir(SNAPSHOTS_DIR)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert!(names.contains(&"db@one@hosta".to_string()), "{names:?}");
        let dir = b
            .core
            .lookup(SNAPSHOTS_DIR, OsStr::new("db@one@hosta"))
            .unwrap()
            .ino;
        let info = b.text(dir, SnapshotFile::Info);
        assert!(
            info.contains("host = \"hosta\"") && info.contains("location = \"bucket\""),
            "{info}"
        );
        let len = 3 * BLOCK + data.len();
        let image = b.read_all(b.image("db@one@hosta"), len);
        assert_eq!(&image[3 * BLOCK..], &data[..]);
        assert!(image[..3 * BLOCK].iter().all(|&x| x == 0));

        // Only its host deletes or shares it.
        let err = b
            .core
            .rmdir(SNAPSHOTS_DIR, OsStr::new("db@one@hosta"), &root())
            .unwrap_err();
        assert_eq!(err.errno(), libc::EPERM, "{err}");
        let chmod = SetAttr {
            mode: Some(0o755),
            ..SetAttr::default()
        };
        assert_eq!(
            b.core.setattr(dir, chmod, &root()).unwrap_err().errno(),
            libc::EPERM
        );

        // A copy on b by reference reads the same bytes, before and after hydration.
        let clone = b.clone_from("db@one@hosta", "copy", len as u64);
        assert_eq!(b.read_all(clone, len), image);
        b.core.hydrate_all().unwrap();
        assert_eq!(b.read_all(clone, len), image);

        // Its first snapshot sends no chunk the bucket has already.
        let before = b.uploaded();
        let csnap = b.snapshot("copy@first");
        assert_eq!(b.core.engine().run_remote_work(), 1);
        assert_eq!(b.status(csnap), "completed");
        assert_eq!(
            b.uploaded(),
            before,
            "every chunk was in the bucket already"
        );
        assert_eq!(a.core.engine().refresh_catalog().unwrap(), 1);
        assert_eq!(a.read_all(a.image("copy@first@hostb"), len), image);
    }

    #[test]
    fn incremental_uploads_send_only_changed_blocks_and_each_snapshot_restores_alone() {
        let bucket = Arc::new(InMemory::new());
        let a = host(&bucket, "hosta");
        let b = host(&bucket, "hostb");
        let vol = a.volume("db", &[]);
        let first = pattern(1, 64 * BLOCK);
        a.write(vol, 0, &first);
        a.snapshot("db@one");
        a.core.engine().run_remote_work();
        let after_first = a.uploaded();
        let changed = pattern(9, BLOCK);
        a.write(vol, 10 * BLOCK as u64, &changed);
        a.snapshot("db@two");
        a.core.engine().run_remote_work();
        let sent = a.uploaded() - after_first;
        assert!(
            sent > 0 && sent <= BLOCK as u64 + 1024,
            "one block's chunk, sent {sent}"
        );
        // Deleting the first leaves the second whole, in the bucket too.
        a.core
            .rmdir(SNAPSHOTS_DIR, OsStr::new("db@one"), &root())
            .unwrap();
        a.core.engine().run_remote_work();
        b.core.engine().refresh_catalog().unwrap();
        assert!(
            b.core
                .lookup(SNAPSHOTS_DIR, OsStr::new("db@one@hosta"))
                .is_err()
        );
        let mut expected = first.clone();
        expected[10 * BLOCK..11 * BLOCK].copy_from_slice(&changed);
        assert_eq!(
            b.read_all(b.image("db@two@hosta"), expected.len()),
            expected
        );
    }

    /// Bytes that do not compress.
    fn random(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Total bytes of the pack objects in the bucket.
    fn pack_bytes(memory: &Arc<InMemory>) -> u64 {
        let store = test_support::store(memory, "lister", None).unwrap();
        store
            .bucket
            .list("packs/")
            .unwrap()
            .iter()
            .map(|l| l.size)
            .sum()
    }

    #[test]
    fn an_upload_cut_short_resumes_after_a_restart_and_sends_nothing_twice() {
        let memory = Arc::new(InMemory::new());
        let a = host(&memory, "hosta");
        let vol = a.volume("db", &[]);
        let data = random(3, 24 * BLOCK);
        a.write(vol, 0, &data);
        let snap = a.snapshot("db@one");
        assert_eq!(a.status(snap), "pending");
        // The store fails part way: some packs are in, the rest not.
        a.bucket
            .writes_left
            .store(5, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(a.core.engine().run_remote_work(), 0);
        assert_eq!(a.status(snap), "pending");
        let info = a.text(snap, SnapshotFile::Info);
        assert!(info.contains("upload_error"), "{info}");
        let first = a.uploaded();
        assert!(
            first > 0 && first < data.len() as u64,
            "part went up: {first}"
        );
        // A restart resumes it, sending only what is missing.
        let storage = a.storage.clone();
        a.core.shutdown();
        drop(a);
        let a = start(&memory, "hosta", storage);
        assert_eq!(a.status(snap), "pending");
        assert_eq!(a.core.engine().run_remote_work(), 1);
        assert_eq!(a.status(snap), "completed");
        let second = a.uploaded();
        assert_eq!(first + second, data.len() as u64, "every chunk sent once");
        assert_eq!(
            pack_bytes(&memory),
            data.len() as u64,
            "no chunk is in two packs"
        );
        let b = host(&memory, "hostb");
        b.core.engine().refresh_catalog().unwrap();
        assert_eq!(b.read_all(b.image("db@one@hosta"), data.len()), data);
    }

    #[test]
    fn while_the_store_is_down_volumes_work_and_the_snapshot_stays_pending_then_completes() {
        let memory = Arc::new(InMemory::new());
        let a = host(&memory, "hosta");
        let vol = a.volume("db", &[(0, 1, 8 * BLOCK)]);
        a.bucket
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let snap = a.snapshot("db@one");
        assert_eq!(a.core.engine().run_remote_work(), 0);
        assert_eq!(a.status(snap), "pending");
        assert!(
            a.text(snap, SnapshotFile::Info)
                .contains("connection refused")
        );
        // The volume does not wait for the store.
        a.write(vol, 0, &[2; 100]);
        assert_eq!(&a.read_all(vol, 100)[..], &[2; 100][..]);
        a.bucket
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(a.core.engine().run_remote_work(), 1);
        assert_eq!(a.status(snap), "completed");
        assert!(!a.text(snap, SnapshotFile::Info).contains("upload_error"));
        let b = host(&memory, "hostb");
        b.core.engine().refresh_catalog().unwrap();
        let image = b.read_all(b.image("db@one@hosta"), 8 * BLOCK);
        assert!(
            image.iter().all(|&x| x == 1),
            "the snapshot, not the later write"
        );
    }

    #[test]
    fn deleting_a_snapshot_still_uploading_stops_its_upload() {
        let bucket = Arc::new(InMemory::new());
        let a = host(&bucket, "hosta");
        let vol = a.volume("db", &[(0, 5, 4 * BLOCK)]);
        a.snapshot("db@one");
        a.core
            .rmdir(SNAPSHOTS_DIR, OsStr::new("db@one"), &root())
            .unwrap();
        a.core.engine().run_remote_work();
        let b = host(&bucket, "hostb");
        assert_eq!(b.core.engine().refresh_catalog().unwrap(), 0);
        // The volume's next snapshot is still right (incremental against the hidden one).
        a.write(vol, 0, &[6; 10]);
        let two = a.snapshot("db@two");
        a.core.engine().run_remote_work();
        assert_eq!(a.status(two), "completed");
        b.core.engine().refresh_catalog().unwrap();
        let image = b.read_all(b.image("db@two@hosta"), 4 * BLOCK);
        assert_eq!(&image[..10], &[6; 10]);
        assert!(image[10..].iter().all(|&x| x == 5));
    }

    #[test]
    fn an_open_image_of_a_snapshot_deleted_on_either_host_keeps_its_attributes() {
        let bucket = Arc::new(InMemory::new());
        let a = host(&bucket, "hosta");
        let b = host(&bucket, "hostb");
        a.volume("db", &[(0, 5, 4 * BLOCK)]);
        a.snapshot("db@one");
        a.core.engine().run_remote_work();
        b.core.engine().refresh_catalog().unwrap();
        let on_a = a.image("db@one");
        let on_b = b.image("db@one@hosta");
        let (fh_a, _) = a.core.open(on_a, false).unwrap();
        let (fh_b, _) = b.core.open(on_b, false).unwrap();
        a.core
            .rmdir(SNAPSHOTS_DIR, OsStr::new("db@one"), &root())
            .unwrap();
        a.core.engine().run_remote_work();
        b.core.engine().refresh_catalog().unwrap();
        for (core, ino, fh) in [(&a.core, on_a, fh_a), (&b.core, on_b, fh_b)] {
            let err = core.getattr(ino).unwrap_err();
            assert_eq!(err.errno(), libc::ENOENT, "{err}");
            let attr = core.getattr_open(ino, Some(fh)).unwrap();
            assert_eq!((attr.ino, attr.size), (ino, 4 * BLOCK as u64));
            let err = core.getattr_open(ino, None).unwrap_err();
            assert_eq!(err.errno(), libc::ENOENT, "{err}");
            let mut buf = vec![0; 2 * BLOCK];
            assert_eq!(
                core.read(ino, fh, 3 * BLOCK as u64, &mut buf).unwrap(),
                BLOCK
            );
            assert!(buf[..BLOCK].iter().all(|&x| x == 5));
            core.release(fh);
        }
    }

    #[test]
    fn a_completed_snapshot_shows_no_upload_error_even_if_the_last_request_failed() {
        // Allow one more write each time until the upload completes: the write
        // after its root (the lease naming it) then fails.
        for writes in 1.. {
            let memory = Arc::new(InMemory::new());
            let a = host(&memory, "hosta");
            a.volume("db", &[(0, 1, 8 * BLOCK)]);
            let snap = a.snapshot("db@one");
            a.bucket
                .writes_left
                .store(writes, std::sync::atomic::Ordering::SeqCst);
            let done = a.core.engine().run_remote_work();
            if a.status(snap) != "completed" {
                assert!(writes < 1000, "no completion");
                continue;
            }
            assert_eq!(done, 0, "precondition: a request after the root failed");
            let info = a.text(snap, SnapshotFile::Info);
            assert!(!info.contains("upload_error"), "{info}");
            break;
        }
    }
}

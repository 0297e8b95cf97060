//! [`MemStorage`]: files in memory that can crash.
//!
//! Each file keeps two versions of its contents: *current* (what reads see; what a
//! `kill -9` of the process leaves) and *durable* (what survived the last sync; what a
//! power loss leaves). Directories do the same for their names: a create, rename or
//! remove is current at once and durable after [`Storage::sync_dir`].
//!
//! [`MemStorage::crash_after`] arms a crash: the n-th state-changing operation from
//! then on fails, and so does every operation after it, as if the process had died
//! there. [`MemStorage::restart`] then gives the storage of a new process: after a
//! [`CrashMode::Process`] crash everything written is still there; after
//! [`CrashMode::PowerLoss`] only what was durable, and the boot id changes. Files the
//! old process opened stay dead, so nothing it left running can change the new state.
//!
//! Contents are kept in 4 KiB pages shared between versions (copy on write), so a
//! sync costs one pointer copy per page. Pages never written are holes.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::sync::{Mutex, MutexGuard, lock};

use super::{Allocate, Create, FileTimes, OpenOptions, Space, Storage, StorageFile, parent_of};

const PAGE: u64 = 4096;

/// What a crash leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// `kill -9`: everything written survives.
    Process,
    /// The host lost power: only what was synced survives.
    PowerLoss,
}

#[derive(Clone, Default)]
struct Content {
    len: u64,
    pages: BTreeMap<u64, Arc<Vec<u8>>>,
}

impl Content {
    fn read(&self, buf: &mut [u8], offset: u64) -> usize {
        let end = offset.saturating_add(buf.len() as u64).min(self.len);
        if offset >= end {
            return 0;
        }
        let n = (end - offset) as usize;
        buf[..n].fill(0);
        for (&page, bytes) in self.pages.range(offset / PAGE..end.div_ceil(PAGE)) {
            let page_start = page * PAGE;
            let from = offset.max(page_start);
            let to = end.min(page_start + PAGE);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&bytes[(from - page_start) as usize..(to - page_start) as usize]);
        }
        n
    }

    fn write(&mut self, data: &[u8], offset: u64) {
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let page_start = page * PAGE;
            let to = end.min(page_start + PAGE);
            let bytes = self
                .pages
                .entry(page)
                .or_insert_with(|| Arc::new(vec![0; PAGE as usize]));
            Arc::make_mut(bytes)[(pos - page_start) as usize..(to - page_start) as usize]
                .copy_from_slice(&data[(pos - offset) as usize..(to - offset) as usize]);
            pos = to;
        }
        self.len = self.len.max(end);
    }

    /// Zeros `[offset, end)`, dropping the pages wholly inside (they become holes).
    fn zero(&mut self, offset: u64, end: u64) {
        let end = end.min(self.len);
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let page_start = page * PAGE;
            let to = end.min(page_start + PAGE);
            // A page zeroed up to its end, or up to the end of the file, is a hole.
            if pos == page_start && (to == page_start + PAGE || to == self.len) {
                self.pages.remove(&page);
            } else if let Some(bytes) = self.pages.get_mut(&page) {
                Arc::make_mut(bytes)[(pos - page_start) as usize..(to - page_start) as usize]
                    .fill(0);
            }
            pos = to;
        }
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            self.zero(len, self.len);
            let first_gone = len.div_ceil(PAGE);
            self.pages.retain(|&page, _| page < first_gone);
        }
        self.len = len;
    }
}

struct Inode {
    current: Content,
    durable: Content,
    times: FileTimes,
}

impl Inode {
    fn new() -> Inode {
        let now = SystemTime::now();
        Inode {
            current: Content::default(),
            durable: Content::default(),
            times: FileTimes {
                accessed: now,
                modified: now,
                changed: now,
            },
        }
    }

    fn touch(&mut self) {
        let now = SystemTime::now();
        self.times.modified = now;
        self.times.changed = now;
    }
}

#[derive(Default)]
struct Dir {
    current: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
}

struct State {
    generation: u64,
    boot: u64,
    crashed: bool,
    ops: u64,
    /// Bytes returned by reads, for tests that bound the work done.
    bytes_read: u64,
    crash_at: Option<u64>,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    dirs: BTreeMap<PathBuf, Dir>,
    locks: HashMap<PathBuf, u64>,
}

fn crashed() -> io::Error {
    io::Error::other("storage crashed (simulated)")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

fn split(path: &Path) -> io::Result<(&Path, OsString)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    Ok((parent_of(path), name.to_os_string()))
}

impl State {
    /// Fails if the caller belongs to a process that crashed.
    fn alive(&self, generation: u64) -> io::Result<()> {
        if self.crashed || generation != self.generation {
            Err(crashed())
        } else {
            Ok(())
        }
    }

    /// Accounts for one state-changing operation, crashing if it is the armed one.
    fn step(&mut self, generation: u64) -> io::Result<()> {
        self.alive(generation)?;
        self.ops += 1;
        if self.crash_at.is_some_and(|at| self.ops >= at) {
            self.crashed = true;
            self.crash_at = None;
            return Err(crashed());
        }
        Ok(())
    }

    fn dir(&self, path: &Path) -> io::Result<&Dir> {
        self.dirs.get(path).ok_or_else(|| not_found(path))
    }

    fn dir_mut(&mut self, path: &Path) -> io::Result<&mut Dir> {
        self.dirs.get_mut(path).ok_or_else(|| not_found(path))
    }

    fn lookup(&self, path: &Path) -> io::Result<Option<u64>> {
        let (parent, name) = split(path)?;
        Ok(self.dir(parent)?.current.get(&name).copied())
    }

    fn inode(&mut self, inode: u64) -> &mut Inode {
        self.inodes.entry(inode).or_insert_with(Inode::new)
    }
}

/// Files in memory, shared by every clone; see the module documentation.
#[derive(Clone)]
pub struct MemStorage {
    state: Arc<Mutex<State>>,
    generation: u64,
}

impl Default for MemStorage {
    fn default() -> MemStorage {
        MemStorage::new()
    }
}

impl MemStorage {
    pub fn new() -> MemStorage {
        let mut dirs = BTreeMap::new();
        dirs.insert(PathBuf::from("/"), Dir::default());
        dirs.insert(PathBuf::from("."), Dir::default());
        MemStorage {
            state: Arc::new(Mutex::new(State {
                generation: 0,
                boot: 0,
                crashed: false,
                ops: 0,
                bytes_read: 0,
                crash_at: None,
                inodes: HashMap::new(),
                next_inode: 1,
                dirs,
                locks: HashMap::new(),
            })),
            generation: 0,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Arms a crash at the `n`-th state-changing operation from now (`n >= 1`).
    pub fn crash_after(&self, n: u64) {
        let mut state = self.state();
        state.crash_at = Some(state.ops + n.max(1));
    }

    /// Cancels an armed crash that has not happened yet.
    pub fn disarm(&self) {
        self.state().crash_at = None;
    }

    /// Crashes now: every operation of this process fails from here on.
    pub fn crash(&self) {
        self.state().crashed = true;
    }

    /// Whether an armed crash has happened.
    pub fn has_crashed(&self) -> bool {
        self.state().crashed
    }

    /// Bytes read from files so far (holes included).
    pub fn bytes_read(&self) -> u64 {
        self.state().bytes_read
    }

    /// State-changing operations so far.
    pub fn operations(&self) -> u64 {
        self.state().ops
    }

    /// The storage a new process sees after a crash (or a clean stop) of this one.
    pub fn restart(&self, mode: CrashMode) -> MemStorage {
        let mut state = self.state();
        state.generation += 1;
        state.crashed = false;
        state.crash_at = None;
        state.locks.clear();
        if mode == CrashMode::PowerLoss {
            state.boot += 1;
            for inode in state.inodes.values_mut() {
                inode.current = inode.durable.clone();
            }
            for dir in state.dirs.values_mut() {
                dir.current = dir.durable.clone();
            }
        }
        MemStorage {
            state: self.state.clone(),
            generation: state.generation,
        }
    }

    /// The current contents of the file at `path`, read atomically with respect to
    /// every other operation (for invariant checks in tests).
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.state();
        let inode = state.lookup(path).ok()??;
        let content = &state.inodes.get(&inode)?.current;
        let mut out = vec![0; content.len as usize];
        content.read(&mut out, 0);
        Some(out)
    }

    /// Runs `check` on the current contents of several files at one instant.
    pub fn inspect<T>(&self, paths: &[&Path], check: impl FnOnce(&[Option<Vec<u8>>]) -> T) -> T {
        let state = self.state();
        let files: Vec<Option<Vec<u8>>> = paths
            .iter()
            .map(|path| {
                let inode = state.lookup(path).ok()??;
                let content = &state.inodes.get(&inode)?.current;
                let mut out = vec![0; content.len as usize];
                content.read(&mut out, 0);
                Some(out)
            })
            .collect();
        check(&files)
    }
}

/// An open file of a [`MemStorage`].
pub struct MemFile {
    storage: MemStorage,
    inode: u64,
}

impl std::fmt::Debug for MemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemFile({})", self.inode)
    }
}

impl MemFile {
    fn read_with<T>(&self, f: impl FnOnce(&Inode) -> T) -> io::Result<T> {
        let mut state = self.storage.state();
        state.alive(self.storage.generation)?;
        Ok(f(state.inode(self.inode)))
    }

    fn change<T>(&self, f: impl FnOnce(&mut Inode) -> T) -> io::Result<T> {
        let mut state = self.storage.state();
        state.step(self.storage.generation)?;
        Ok(f(state.inode(self.inode)))
    }
}

impl StorageFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut state = self.storage.state();
        state.alive(self.storage.generation)?;
        let n = state.inode(self.inode).current.read(buf, offset);
        state.bytes_read += n as u64;
        Ok(n)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.change(|inode| {
            inode.current.write(data, offset);
            inode.touch();
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.read_with(|inode| inode.current.len)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        self.read_with(|inode| inode.current.pages.len() as u64 * PAGE)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.change(|inode| {
            inode.current.set_len(len);
            inode.touch();
        })
    }

    fn allocate(&self, how: Allocate, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len);
        self.change(|inode| {
            let content = &mut inode.current;
            match how {
                Allocate::Reserve { keep_size } => {
                    if !keep_size && end > content.len {
                        content.len = end;
                    }
                }
                Allocate::PunchHole => content.zero(offset, end),
                Allocate::ZeroRange { keep_size } => {
                    content.zero(offset, end);
                    if !keep_size && end > content.len {
                        content.len = end;
                    }
                }
            }
            inode.touch();
        })
    }

    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.read_with(|inode| {
            let content = &inode.current;
            content
                .pages
                .range(offset / PAGE..)
                .next()
                .map(|(&page, _)| (page * PAGE).max(offset))
                .filter(|&at| at < content.len)
        })
    }

    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        self.read_with(|inode| {
            let content = &inode.current;
            let mut page = offset / PAGE;
            while content.pages.contains_key(&page) {
                page += 1;
            }
            (page * PAGE).max(offset).min(content.len.max(offset))
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.change(|inode| inode.durable = inode.current.clone())
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn times(&self) -> io::Result<FileTimes> {
        self.read_with(|inode| inode.times)
    }

    fn set_times(
        &self,
        accessed: Option<SystemTime>,
        modified: Option<SystemTime>,
    ) -> io::Result<()> {
        self.change(|inode| {
            if let Some(t) = accessed {
                inode.times.accessed = t;
            }
            if let Some(t) = modified {
                inode.times.modified = t;
            }
        })
    }
}

impl redb::StorageBackend for MemFile {
    fn len(&self) -> io::Result<u64> {
        StorageFile::len(self)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        if StorageFile::read_at(self, out, offset)? == out.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the database",
            ))
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        StorageFile::set_len(self, len)
    }

    fn sync_data(&self) -> io::Result<()> {
        StorageFile::sync_data(self)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_all_at(data, offset)
    }
}

/// A claim on a lock file of a [`MemStorage`]; released when dropped.
pub struct MemLock {
    storage: MemStorage,
    path: PathBuf,
}

impl Drop for MemLock {
    fn drop(&mut self) {
        let mut state = self.storage.state();
        if state.locks.get(&self.path) == Some(&self.storage.generation) {
            state.locks.remove(&self.path);
        }
    }
}

impl Storage for MemStorage {
    type File = MemFile;
    type Database = MemFile;
    type Lock = MemLock;

    fn open(&self, path: &Path, options: OpenOptions) -> io::Result<MemFile> {
        let mut state = self.state();
        state.alive(self.generation)?;
        let existing = state.lookup(path)?;
        let inode = match (existing, options.create) {
            (Some(inode), Create::Truncate) => {
                state.step(self.generation)?;
                state.inode(inode).current.set_len(0);
                inode
            }
            (Some(inode), _) => inode,
            (None, Create::No) => return Err(not_found(path)),
            (None, _) => {
                state.step(self.generation)?;
                let inode = state.next_inode;
                state.next_inode += 1;
                state.inodes.insert(inode, Inode::new());
                let (parent, name) = split(path)?;
                state.dir_mut(parent)?.current.insert(name, inode);
                inode
            }
        };
        drop(state);
        Ok(MemFile {
            storage: self.clone(),
            inode,
        })
    }

    fn open_database(&self, path: &Path, create: bool) -> io::Result<MemFile> {
        let create = if create {
            Create::IfMissing
        } else {
            Create::No
        };
        self.open(
            path,
            OpenOptions {
                create,
                direct_io: false,
            },
        )
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.alive(self.generation)?;
        let inode = state.lookup(from)?.ok_or_else(|| not_found(from))?;
        let (to_parent, to_name) = split(to)?;
        state.dir(to_parent)?;
        state.step(self.generation)?;
        let (from_parent, from_name) = split(from)?;
        state.dir_mut(from_parent)?.current.remove(&from_name);
        state.dir_mut(to_parent)?.current.insert(to_name, inode);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.alive(self.generation)?;
        state.lookup(path)?.ok_or_else(|| not_found(path))?;
        state.step(self.generation)?;
        let (parent, name) = split(path)?;
        state.dir_mut(parent)?.current.remove(&name);
        Ok(())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.alive(self.generation)?;
        for dir in path.ancestors().filter(|p| !p.as_os_str().is_empty()) {
            state.dirs.entry(dir.to_path_buf()).or_default();
        }
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.dir(path)?;
        state.step(self.generation)?;
        let dir = state.dir_mut(path)?;
        dir.durable = dir.current.clone();
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        let state = self.state();
        state.alive(self.generation)?;
        let mut names: Vec<OsString> = state.dir(path)?.current.keys().cloned().collect();
        names.extend(
            state
                .dirs
                .keys()
                .filter(|d| d.parent() == Some(path))
                .filter_map(|d| d.file_name().map(|n| n.to_os_string())),
        );
        names.sort();
        Ok(names)
    }

    fn file_len(&self, path: &Path) -> io::Result<Option<u64>> {
        let state = self.state();
        state.alive(self.generation)?;
        if state.dirs.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("{} is a directory", path.display()),
            ));
        }
        match state.lookup(path) {
            Ok(Some(inode)) => Ok(state.inodes.get(&inode).map(|i| i.current.len)),
            Ok(None) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.state().dirs.contains_key(path)
    }

    fn try_lock(&self, path: &Path) -> io::Result<MemLock> {
        let mut state = self.state();
        state.alive(self.generation)?;
        if state.locks.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is locked", path.display()),
            ));
        }
        state.locks.insert(path.to_path_buf(), self.generation);
        Ok(MemLock {
            storage: self.clone(),
            path: path.to_path_buf(),
        })
    }

    fn boot_id(&self) -> String {
        format!("memory-boot-{}", self.state().boot)
    }

    fn space(&self, _path: &Path) -> io::Result<Space> {
        let state = self.state();
        let used: u64 = state
            .inodes
            .values()
            .map(|i| i.current.pages.len() as u64)
            .sum();
        let blocks = 1 << 30;
        Ok(Space {
            blocks,
            blocks_free: blocks - used,
            blocks_available: blocks - used,
            files: 1 << 20,
            files_free: (1 << 20) - state.inodes.len() as u64,
            block_size: PAGE as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> MemStorage {
        let storage = MemStorage::new();
        storage.create_dir_all(Path::new("/d")).unwrap();
        storage
    }

    #[test]
    fn reads_writes_holes_and_truncation() {
        let storage = setup();
        let f = storage
            .open(Path::new("/d/f"), OpenOptions::CREATE)
            .unwrap();
        f.write_all_at(b"hello", 10_000).unwrap();
        assert_eq!(f.len().unwrap(), 10_005);
        let mut buf = [1u8; 20];
        assert_eq!(f.read_at(&mut buf, 9_990).unwrap(), 15);
        assert_eq!(&buf[..10], &[0; 10]);
        assert_eq!(&buf[10..15], b"hello");
        assert_eq!(f.seek_data(0).unwrap(), Some(8192));
        assert_eq!(f.seek_hole(0).unwrap(), 0);
        assert_eq!(f.seek_hole(8192).unwrap(), 10_005);
        assert_eq!(f.seek_data(10_005).unwrap(), None);
        f.allocate(Allocate::PunchHole, 8192, 4096).unwrap();
        assert_eq!(f.seek_data(0).unwrap(), None);
        assert_eq!(f.allocated_bytes().unwrap(), 0);
        f.write_all_at(&[7; 8192], 0).unwrap();
        f.set_len(100).unwrap();
        f.set_len(8192).unwrap();
        let mut back = vec![1u8; 8192];
        f.read_at(&mut back, 0).unwrap();
        assert!(back[..100].iter().all(|&b| b == 7) && back[100..].iter().all(|&b| b == 0));
    }

    #[test]
    fn power_loss_keeps_only_synced_bytes_and_names() {
        let storage = setup();
        let f = storage
            .open(Path::new("/d/f"), OpenOptions::CREATE)
            .unwrap();
        f.write_all_at(b"synced", 0).unwrap();
        f.sync_data().unwrap();
        storage.sync_dir(Path::new("/d")).unwrap();
        f.write_all_at(b"SYNCED later", 0).unwrap();
        storage
            .open(Path::new("/d/g"), OpenOptions::CREATE)
            .unwrap();

        let after_kill = storage.restart(CrashMode::Process);
        let boot_before = after_kill.boot_id();
        assert_eq!(
            after_kill.contents(Path::new("/d/f")).unwrap(),
            b"SYNCED later"
        );
        assert!(after_kill.file_len(Path::new("/d/g")).unwrap().is_some());
        // The old process's handle is dead.
        assert!(f.write_all_at(b"x", 0).is_err());

        let after_power_loss = after_kill.restart(CrashMode::PowerLoss);
        assert_eq!(
            after_power_loss.contents(Path::new("/d/f")).unwrap(),
            b"synced"
        );
        assert_eq!(after_power_loss.file_len(Path::new("/d/g")).unwrap(), None);
        assert_ne!(boot_before, after_power_loss.boot_id());
    }

    #[test]
    fn an_armed_crash_stops_every_later_operation() {
        let storage = setup();
        let f = storage
            .open(Path::new("/d/f"), OpenOptions::CREATE)
            .unwrap();
        storage.crash_after(2);
        f.write_all_at(b"one", 0).unwrap();
        assert!(f.write_all_at(b"two", 0).is_err());
        assert!(storage.has_crashed());
        let mut buf = [0u8; 3];
        assert!(f.read_at(&mut buf, 0).is_err());
        let storage = storage.restart(CrashMode::Process);
        assert_eq!(storage.contents(Path::new("/d/f")).unwrap(), b"one");
    }

    #[test]
    fn locks_are_exclusive_until_dropped_or_restart() {
        let storage = setup();
        let held = storage.try_lock(Path::new("/d/lock")).unwrap();
        assert_eq!(
            storage.try_lock(Path::new("/d/lock")).err().unwrap().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(held);
        let _again = storage.try_lock(Path::new("/d/lock")).unwrap();
        let restarted = storage.restart(CrashMode::Process);
        restarted.try_lock(Path::new("/d/lock")).unwrap();
    }
}

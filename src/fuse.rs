//! The FUSE adapter: unpacks each kernel request, calls [`FsCore`], replies.
//!
//! Nothing here decides anything about volumes or snapshots. Attributes are never
//! cached by the kernel (zero TTL): sizes, statuses and progress change behind its
//! back. Volume files are opened for direct I/O with parallel writes, so data is cached
//! once (in the data file's page cache) and loop devices keep many requests in flight.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use log::{debug, warn};

use crate::fs::{Attr, Caller, FileKind, FsCore, FsError, OpenMode, SetAttr, XattrFlags};
use crate::storage::Storage;
use crate::storage::direct::AlignedBuf;

const TTL: Duration = Duration::ZERO;
/// Largest request the kernel may send (its limit is 256 pages).
const MAX_REQUEST_BYTES: u32 = 1 << 20;
const MAX_BACKGROUND: u16 = 128;

pub struct EbsFuse<S: Storage> {
    core: Arc<FsCore<S>>,
}

impl<S: Storage> EbsFuse<S> {
    pub fn new(core: Arc<FsCore<S>>) -> EbsFuse<S> {
        EbsFuse { core }
    }
}

thread_local! {
    /// One read buffer per FUSE thread, reused across requests; aligned so that
    /// volume reads can go straight from the disk into it.
    static READ_BUF: RefCell<AlignedBuf> = const { RefCell::new(AlignedBuf::new()) };
}

/// The request's fs ids; its sender's supplementary groups are looked up only if a
/// decision needs them.
fn caller(req: &Request) -> Caller {
    Caller::of_process(req.uid(), req.gid(), req.pid())
}

fn to_file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.blocks,
        atime: attr.atime,
        mtime: attr.mtime,
        ctime: attr.ctime,
        crtime: attr.ctime,
        kind: match attr.kind {
            FileKind::Directory => FileType::Directory,
            FileKind::RegularFile => FileType::RegularFile,
        },
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn open_flags(mode: OpenMode) -> FopenFlags {
    match mode {
        OpenMode::Volume => FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        OpenMode::Text => FopenFlags::FOPEN_DIRECT_IO,
        OpenMode::Image => FopenFlags::FOPEN_KEEP_CACHE,
    }
}

/// Logs why a request failed and turns the error into its errno.
fn errno(op: &str, target: impl std::fmt::Display, err: &FsError) -> Errno {
    if err.is_routine() {
        debug!("{op} {target}: {err}");
    } else {
        warn!("{op} {target}: {err}");
    }
    Errno::from_i32(err.errno())
}

fn time_of(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn wants_write(flags: OpenFlags) -> bool {
    !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY)
}

impl<S: Storage> Filesystem for EbsFuse<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_REQUEST_BYTES);
        let _ = config.set_max_readahead(MAX_REQUEST_BYTES);
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        for wanted in [
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
            InitFlags::FUSE_MAX_PAGES,
        ] {
            if config.add_capabilities(wanted).is_err() {
                debug!("kernel lacks {wanted:?}");
            }
        }
        // The kernel then enforces ACLs itself and keeps them through getxattr and
        // setxattr of system.posix_acl_*.
        match config.add_capabilities(InitFlags::FUSE_POSIX_ACL) {
            Ok(()) => self.core.enable_posix_acls(),
            Err(_) => warn!("the kernel lacks FUSE_POSIX_ACL: setfacl is refused on this mount"),
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.core.lookup(parent.0, name) {
            Ok(attr) => reply.entry(&TTL, &to_file_attr(&attr), Generation(0)),
            Err(e) => reply.error(errno("lookup", name.to_string_lossy(), &e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.core.getattr_open(ino.0, fh.map(|fh| fh.0)) {
            Ok(attr) => reply.attr(&TTL, &to_file_attr(&attr)),
            Err(e) => reply.error(errno("getattr", ino.0, &e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_of),
            mtime: mtime.map(time_of),
        };
        match self.core.setattr(ino.0, changes, &caller(req)) {
            Ok(attr) => reply.attr(&TTL, &to_file_attr(&attr)),
            Err(e) => reply.error(errno("setattr", ino.0, &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            let e = FsError::NotPermitted("only regular files (volumes) can be created".into());
            return reply.error(errno("mknod", name.to_string_lossy(), &e));
        }
        match self
            .core
            .create_volume(parent.0, name, mode & !umask, &caller(req), true)
        {
            Ok(attr) => reply.entry(&TTL, &to_file_attr(&attr), Generation(0)),
            Err(e) => reply.error(errno("mknod", name.to_string_lossy(), &e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.core.mkdir(parent.0, name, &caller(req)) {
            Ok(attr) => reply.entry(&TTL, &to_file_attr(&attr), Generation(0)),
            Err(e) => reply.error(errno("mkdir", name.to_string_lossy(), &e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.core.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("unlink", name.to_string_lossy(), &e)),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.core.rmdir(parent.0, name, &caller(req)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("rmdir", name.to_string_lossy(), &e)),
        }
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        let e = FsError::NotPermitted(
            "symbolic links are not supported: volumes are plain files".into(),
        );
        reply.error(errno("symlink", link_name.to_string_lossy(), &e));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let e = FsError::NotPermitted(
            "hard links are not supported: copy the volume or take a snapshot".into(),
        );
        reply.error(errno("link", newname.to_string_lossy(), &e));
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            let e = FsError::Invalid("rename exchange/whiteout is not supported".into());
            return reply.error(errno("rename", name.to_string_lossy(), &e));
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self.core.rename(
            parent.0,
            name,
            newparent.0,
            newname,
            no_replace,
            &caller(req),
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("rename", name.to_string_lossy(), &e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.core.open(ino.0, wants_write(flags)) {
            Ok((fh, mode)) => reply.opened(FileHandle(fh), open_flags(mode)),
            Err(e) => reply.error(errno("open", ino.0, &e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let exclusive = flags & libc::O_EXCL != 0;
        let created = self
            .core
            .create_volume(parent.0, name, mode & !umask, &caller(req), exclusive)
            .and_then(|attr| Ok((attr, self.core.open(attr.ino, true)?)));
        match created {
            Ok((attr, (fh, mode))) => reply.created(
                &TTL,
                &to_file_attr(&attr),
                Generation(0),
                FileHandle(fh),
                open_flags(mode),
            ),
            Err(e) => reply.error(errno("create", name.to_string_lossy(), &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        READ_BUF.with_borrow_mut(|buf| {
            let buf = buf.slice_mut(size as usize);
            match self.core.read(ino.0, fh.0, offset, buf) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(errno(
                    "read",
                    format_args!("inode {} at {offset}", ino.0),
                    &e,
                )),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.core.write(ino.0, fh.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(
                "write",
                format_args!("inode {} at {offset}", ino.0),
                &e,
            )),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes reach the data file before they are acknowledged; durability
        // against host crashes is fsync's job.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.core.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.core.fsync(ino.0, fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsync", ino.0, &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.core.readdir(ino.0) {
            Ok(entries) => {
                for (i, entry) in entries.iter().enumerate().skip(offset as usize) {
                    let kind = match entry.kind {
                        FileKind::Directory => FileType::Directory,
                        FileKind::RegularFile => FileType::RegularFile,
                    };
                    if reply.add(INodeNo(entry.ino), (i + 1) as u64, kind, &entry.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno("readdir", ino.0, &e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Namespace changes are committed before they are acknowledged.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.core.statfs() {
            Ok(s) => reply.statfs(
                s.blocks,
                s.blocks_free,
                s.blocks_available,
                s.files,
                s.files_free,
                s.block_size,
                s.name_max,
                s.block_size,
            ),
            Err(e) => reply.error(errno("statfs", "", &e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let flags = XattrFlags {
            create_only: flags & libc::XATTR_CREATE != 0,
            replace_only: flags & libc::XATTR_REPLACE != 0,
        };
        match self
            .core
            .setxattr(ino.0, name, Some(value), flags, &caller(req))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("setxattr", name.to_string_lossy(), &e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.core.getxattr(ino.0, name) {
            Ok(value) => reply_xattr(reply, size, &value),
            Err(e) => reply.error(errno("getxattr", name.to_string_lossy(), &e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.core.listxattr(ino.0) {
            Ok(names) => {
                let mut list = Vec::new();
                for name in names {
                    list.extend_from_slice(name.as_bytes());
                    list.push(0);
                }
                reply_xattr(reply, size, &list);
            }
            Err(e) => reply.error(errno("listxattr", ino.0, &e)),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .core
            .setxattr(ino.0, name, None, XattrFlags::default(), &caller(req))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("removexattr", name.to_string_lossy(), &e)),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // No ioctls: "not a terminal" is what tools probing (isatty) expect to hear.
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Mounted with default_permissions: the kernel checks modes itself.
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.core.fallocate(ino.0, fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fallocate", ino.0, &e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self
            .core
            .copy_range(fh_in.0, offset_in, ino_out.0, fh_out.0, offset_out, len)
        {
            // The kernel limits one request to what a u32 counts; it asks again.
            Ok(n) => reply.written(n.min(u64::from(u32::MAX) & !0xfff) as u32),
            Err(e) => reply.error(errno(
                "copy_file_range",
                format_args!("to inode {} at {offset_out}", ino_out.0),
                &e,
            )),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        match self.core.lseek(ino.0, fh.0, offset, whence) {
            Ok(pos) => reply.offset(pos as i64),
            Err(e) => reply.error(errno("lseek", ino.0, &e)),
        }
    }
}

/// Answers a size probe (`size == 0`) or the value itself.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::from_i32(FsError::Range.errno()));
    } else {
        reply.data(value);
    }
}

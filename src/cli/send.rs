//! `ebsfs snapshot send|receive`: a snapshot from one data directory to another as a
//! stream ([`crate::snapshot::stream`]), through plain file operations on both mounts.
//!
//! `send` reads `snapshots/ID/volume.img`: a full stream holds its data runs
//! (`SEEK_DATA`/`SEEK_HOLE`), an incremental one the ranges `ebsfs snapshot diff BASE
//! ID` lists. `receive` works in a volume of the snapshot's volume name (snapshot ids
//! are `VOLUME@LABEL`): made empty for a full stream, as an instant copy of the base
//! for an incremental one (so the new snapshot is incremental against the base here
//! too); it writes each record once verified, and only after the trailer verified
//! takes the snapshot, marks it with the sender's identity (`user.ebsfs.origin`),
//! waits for it to complete and deletes the volume. Whatever fails, the volume and
//! any snapshot it made go again: a damaged stream never leaves a snapshot.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::snapshot::{
    Failure, SnapshotRef, changed_between, explain, get_xattr, info_value, read_field, set_xattr,
    snapshot_dir, wait_for,
};
use super::volume::make_volume;
use crate::config::ByteSize;
use crate::names::SnapshotName;
use crate::snapshot::ORIGIN_XATTR;
use crate::snapshot::stream::{
    Content, Identity, StreamBase, StreamHeader, StreamReader, StreamWriter, write_ranges,
};

/// `ebsfs snapshot send ID [--since BASE]`: the stream of `id` to `out`.
pub(super) fn send(
    mnt: &Path,
    id: &SnapshotName,
    since: Option<&SnapshotName>,
    out: impl Write,
) -> Result<(), Failure> {
    let name = id.to_string();
    let info = completed_info(mnt, &name)?;
    let size = info_integer(&info, &name, "size")?;
    let base = since
        .map(|base| -> Result<StreamBase, Failure> {
            let base_info = completed_info(mnt, &base.to_string())?;
            Ok(StreamBase {
                snapshot: base.clone(),
                identity: identity(mnt, &base.to_string(), &base_info)?,
            })
        })
        .transpose()?;
    let dir = snapshot_dir(mnt, &name);
    let image = File::open(dir.join("volume.img"))
        .map_err(|e| Failure(1, explain(&e, &format!("{name}/volume.img"))))?;
    let ranges = match &base {
        Some(base) => changed_between(mnt, &base.snapshot.to_string(), &name)?,
        None => data_runs(&image, size),
    };
    let header = StreamHeader {
        snapshot: id.clone(),
        size_bytes: size,
        block_size: info_integer(&info, &name, "block_size")? as u32,
        identity: identity(mnt, &name, &info)?,
        base,
        xattrs: user_xattrs(&dir).map_err(|e| Failure(1, format!("{name}: attributes: {e}")))?,
    };
    let failed = |e: std::io::Error| Failure(1, format!("sending {name}: {e}"));
    let mut writer =
        StreamWriter::new(BufWriter::with_capacity(1 << 20, out), &header).map_err(failed)?;
    write_ranges(&mut writer, &ranges, since.is_none(), |at, buf| {
        image.read_exact_at(buf, at)
    })
    .map_err(failed)?;
    let (_, totals) = writer.finish().map_err(failed)?;
    let how = match since {
        Some(base) => format!(", incremental since {base}"),
        None => String::new(),
    };
    eprintln!(
        "{name}: sent {} records, {} of data and {} of zeros{how}",
        totals.records,
        ByteSize(totals.data_bytes),
        ByteSize(totals.zero_bytes)
    );
    Ok(())
}

/// The `info` of snapshot `id`, which must be completed.
fn completed_info(mnt: &Path, id: &str) -> Result<toml::Table, Failure> {
    let dir = snapshot_dir(mnt, id);
    let status = read_field(&dir, "status").map_err(|e| Failure(1, explain(&e, id)))?;
    if status != "completed" {
        return Err(Failure(
            1,
            format!("{id} is {status}: only a completed snapshot can be sent or be a base"),
        ));
    }
    let text = read_field(&dir, "info").map_err(|e| Failure(1, explain(&e, id)))?;
    toml::from_str(&text).map_err(|e| Failure(1, format!("{id}/info: {e}")))
}

fn info_integer(info: &toml::Table, id: &str, key: &str) -> Result<u64, Failure> {
    info.get(key)
        .and_then(toml::Value::as_integer)
        .and_then(|v| u64::try_from(v).ok())
        .ok_or_else(|| Failure(1, format!("{id}/info has no {key}")))
}

/// A snapshot's identity: the one it was received with (`user.ebsfs.origin`), else
/// derived from what `info` says of it here.
fn identity(mnt: &Path, id: &str, info: &toml::Table) -> Result<Identity, Failure> {
    let origin = get_xattr(&snapshot_dir(mnt, id), ORIGIN_XATTR)
        .map_err(|e| Failure(1, format!("{id}: reading {ORIGIN_XATTR}: {e}")))?;
    match origin {
        Some(value) => std::str::from_utf8(&value)
            .ok()
            .and_then(Identity::parse)
            .ok_or_else(|| Failure(1, format!("{id}: {ORIGIN_XATTR} is not 64 hex digits"))),
        None => Ok(Identity::derive(
            &info_value(info, "host"),
            info_integer(info, id, "id")?,
            id,
            &info_value(info, "created"),
            &info_value(info, "completed"),
        )),
    }
}

/// The runs of `image` that may hold data (`SEEK_DATA`/`SEEK_HOLE`); all of it if
/// the filesystem cannot tell.
fn data_runs(image: &File, size: u64) -> Vec<Range<u64>> {
    let fd = image.as_raw_fd();
    let mut runs = Vec::new();
    let mut at: u64 = 0;
    while at < size {
        // SAFETY: lseek on an open descriptor; the offsets are plain integers.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            return match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => runs,
                _ => std::iter::once(0..size).collect(),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return std::iter::once(0..size).collect();
        }
        let run = (data as u64)..(hole as u64).min(size);
        if run.is_empty() {
            break;
        }
        at = run.end;
        runs.push(run);
    }
    runs
}

/// The `user.*` attributes of `path` a stream carries: not ebsfs's own
/// (`user.ebsfs.*`: its lock is this host's, its identity travels in the header).
fn user_xattrs(path: &Path) -> std::io::Result<std::collections::BTreeMap<String, Vec<u8>>> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: the path is NUL-terminated; names is valid for its length.
    let len = unsafe { libc::listxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error());
    }
    names.truncate(len as usize);
    let mut xattrs = std::collections::BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if !name.starts_with("user.") || name.starts_with("user.ebsfs.") {
            continue;
        }
        if let Some(value) = get_xattr(path, &name)? {
            xattrs.insert(name, value);
        }
    }
    Ok(xattrs)
}

/// What a receive made so far, removed again unless it [`Working::finish`]es.
struct Working {
    volume: PathBuf,
    snapshot: Option<PathBuf>,
    done: bool,
}

impl Working {
    fn finish(mut self) -> std::io::Result<()> {
        self.done = true;
        fs::remove_file(&self.volume)
    }
}

impl Drop for Working {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(snapshot) = &self.snapshot
            && let Err(e) = fs::remove_dir(snapshot)
        {
            eprintln!("ebsfs: removing {}: {e}", snapshot.display());
        }
        if let Err(e) = fs::remove_file(&self.volume) {
            eprintln!("ebsfs: removing {}: {e}", self.volume.display());
        }
    }
}

/// Set by SIGINT, SIGTERM or SIGHUP during a receive: it stops and removes what it
/// made, instead of dying with its working volume left behind.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT, SIGTERM and SIGHUP into [`INTERRUPTED`], without `SA_RESTART`, so
/// that a read of the stream blocked in the kernel returns.
fn catch_interrupts() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores an atomic.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

fn interrupted() -> std::io::Error {
    std::io::Error::other("interrupted by a signal")
}

/// A stream's input that fails once a signal asked the receive to stop.
struct Interruptible<R>(R);

impl<R: Read> Read for Interruptible<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Err(interrupted());
            }
            match self.0.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                result => return result,
            }
        }
    }
}

/// `ebsfs snapshot receive`: recreates the snapshot of the stream on `input`. A
/// signal (Ctrl-C) before the snapshot is taken stops it and removes what it made;
/// from then on it goes to the end (the snapshot completes on its own anyway).
pub(super) fn receive(mnt: &Path, input: impl Read) -> Result<(), Failure> {
    catch_interrupts();
    let input = Interruptible(input);
    let (mut reader, header) =
        StreamReader::open(BufReader::with_capacity(1 << 20, input)).map_err(refused)?;
    check_receivable(mnt, &header)?;
    let id = header.snapshot.to_string();
    let volume = header.snapshot.volume();
    let from = header.base.as_ref().map(|base| SnapshotRef {
        name: base.snapshot.clone(),
        foreign: None,
    });
    let sized = from.is_none().then_some(header.size_bytes);
    make_volume(mnt, volume, from.as_ref(), sized)?;
    let mut working = Working {
        volume: mnt.join("volumes").join(volume.file_name()),
        snapshot: None,
        done: false,
    };
    let io_failed = |what: &str, e: std::io::Error| Failure(1, format!("{id}: {what}: {e}"));
    let file = OpenOptions::new()
        .write(true)
        .open(&working.volume)
        .map_err(|e| io_failed("opening the volume", e))?;
    if from.is_some() {
        file.set_len(header.size_bytes)
            .map_err(|e| io_failed("sizing the volume", e))?;
    }
    while let Some(record) = reader.next_record().map_err(refused)? {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err(refused(crate::snapshot::stream::StreamError::Io(
                interrupted(),
            )));
        }
        let written = match &record.content {
            Content::Data(bytes) => file.write_all_at(bytes, record.offset),
            Content::Zeros(len) => write_zeros(&file, record.offset, *len),
        };
        written.map_err(|e| io_failed(&format!("writing at offset {}", record.offset), e))?;
    }
    file.sync_all()
        .map_err(|e| io_failed("flushing the volume", e))?;
    drop(file);
    snapshot_working_volume(mnt, &header, &mut working)?;
    if let Err(e) = working.finish() {
        eprintln!("ebsfs: {id} received, but removing volume {volume} failed: {e}");
    }
    let totals = reader.totals();
    let how = match &header.base {
        Some(base) => format!(", incremental on {}", base.snapshot),
        None => String::new(),
    };
    println!(
        "{id}: received {} records, {} of data and {} of zeros{how}",
        totals.records,
        ByteSize(totals.data_bytes),
        ByteSize(totals.zero_bytes)
    );
    Ok(())
}

/// Refuses a stream whose snapshot exists here, or whose volume name is taken (the
/// receive works in a volume of that name), or whose base is not here.
fn check_receivable(mnt: &Path, header: &StreamHeader) -> Result<(), Failure> {
    let id = header.snapshot.to_string();
    if fs::symlink_metadata(snapshot_dir(mnt, &id)).is_ok() {
        return Err(Failure(1, format!("{id} already exists here")));
    }
    if fs::symlink_metadata(mnt.join(super::recycle_bin::DIR).join(&id)).is_ok() {
        return Err(Failure(
            1,
            format!(
                "{id} is in the recycle bin here: restore it (ebsfs recycle-bin restore {id}) \
                 or purge it first"
            ),
        ));
    }
    let volume = header.snapshot.volume();
    if fs::symlink_metadata(mnt.join("volumes").join(volume.file_name())).is_ok() {
        return Err(Failure(
            1,
            format!(
                "a volume named {volume} exists here, and receiving {id} works in a volume of \
                 that name: rename it (mv volumes/{0} volumes/OTHER.img) and receive again",
                volume.file_name()
            ),
        ));
    }
    match &header.base {
        Some(base) => check_base(mnt, base),
        None => Ok(()),
    }
}

/// The end of a receive, once the stream verified: the snapshot's attributes on the
/// volume (so the snapshot takes them), the snapshot, its identity, completion.
fn snapshot_working_volume(
    mnt: &Path,
    header: &StreamHeader,
    working: &mut Working,
) -> Result<(), Failure> {
    let id = header.snapshot.to_string();
    let io_failed = |what: &str, e: std::io::Error| Failure(1, format!("{id}: {what}: {e}"));
    for (name, value) in &header.xattrs {
        if !name.starts_with("user.ebsfs.") {
            set_xattr(&working.volume, name, value)
                .map_err(|e| io_failed(&format!("setting {name}"), e))?;
        }
    }
    let dir = snapshot_dir(mnt, &id);
    fs::create_dir(&dir).map_err(|e| Failure(1, explain(&e, &id)))?;
    working.snapshot = Some(dir.clone());
    // At once, while pending: a receive killed from here on leaves the snapshot
    // (whole: its capture completes on its own) with the sender's identity.
    set_xattr(&dir, ORIGIN_XATTR, header.identity.to_string().as_bytes())
        .map_err(|e| io_failed(&format!("setting {ORIGIN_XATTR}"), e))?;
    wait_for(mnt, &id)
}

fn refused(e: crate::snapshot::stream::StreamError) -> Failure {
    Failure(1, format!("{e}; nothing was received"))
}

/// Refuses an incremental stream unless its base is here, completed, and the very
/// snapshot the sender diffed against.
fn check_base(mnt: &Path, base: &StreamBase) -> Result<(), Failure> {
    let name = base.snapshot.to_string();
    if fs::symlink_metadata(snapshot_dir(mnt, &name)).is_err() {
        return Err(Failure(
            1,
            format!(
                "base {name} missing: the stream is incremental on it; receive {name} first \
                 (or send a full stream)"
            ),
        ));
    }
    let info = completed_info(mnt, &name)?;
    let here = identity(mnt, &name, &info)?;
    if here != base.identity {
        return Err(Failure(
            1,
            format!(
                "{name} here is a different snapshot from the stream's base (identity {here}, \
                 the stream needs {}): send a full stream, or from the matching base",
                base.identity
            ),
        ));
    }
    Ok(())
}

/// Makes `[offset, offset + len)` of `file` read as zeros: a punched hole, else
/// written zeros.
fn write_zeros(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an open descriptor; the range is plain integers.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; crate::snapshot::stream::MAX_RECORD_BYTES];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

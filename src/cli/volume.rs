//! `ebsfs volume create|list`: plain file operations on the mount.
//!
//! `create --from VOL@LABEL` is `cp snapshots/VOL@LABEL/volume.img volumes/NAME.img`
//! done with one `copy_file_range(2)` loop, which the daemon turns into a copy by
//! reference (no data read or written); `list` reads sizes with `stat` and the
//! read-only attributes `user.ebsfs.source` and `user.ebsfs.hydrated`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Instant;

use clap::Subcommand;

use super::MountLocation;
use super::snapshot::{
    Failure, SnapshotRef, exit_code, get_xattr, parse_ref, snapshot_dir, with_mount,
};
use crate::config::ByteSize;
use crate::names::VolumeName;

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create volume NAME: empty, or a copy of a snapshot (instant: blocks are shared
    /// with the snapshot and copied in the background).
    Create {
        name: String,
        /// Make the volume from this snapshot: VOLUME@LABEL, or VOLUME@LABEL@HOST for
        /// another host's snapshot in the snapshot store (read from the bucket until
        /// hydrated).
        #[arg(long, value_name = "VOL@LABEL[@HOST]")]
        from: Option<String>,
        /// Size of the volume (e.g. 10GiB); at least the snapshot's size with --from.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        #[command(flatten)]
        location: MountLocation,
    },
    /// List volumes: size, allocated bytes, the snapshot each was made from, and how
    /// much of that snapshot it holds itself (hydrated).
    List {
        #[command(flatten)]
        location: MountLocation,
    },
}

fn parse_size(text: &str) -> Result<u64, String> {
    ByteSize::parse(text).map(|b| b.0)
}

pub fn run(cmd: VolumeCommand) -> i32 {
    let result = match cmd {
        VolumeCommand::Create {
            name,
            from,
            size,
            location,
        } => parse_create(&name, from.as_deref()).and_then(|(name, from)| {
            with_mount(&location, |mnt| create(mnt, &name, from.as_ref(), size))
        }),
        VolumeCommand::List { location } => with_mount(&location, list),
    };
    exit_code(result)
}

fn parse_create(
    name: &str,
    from: Option<&str>,
) -> Result<(VolumeName, Option<SnapshotRef>), Failure> {
    let name = VolumeName::parse(name)
        .map_err(|e| Failure(2, format!("invalid volume name `{name}`: {e}")))?;
    let from = from.map(parse_ref).transpose()?;
    Ok((name, from))
}

fn io_failure(what: &str, e: &std::io::Error) -> Failure {
    let why = match e.raw_os_error() {
        Some(libc::EACCES) => "permission denied".to_string(),
        Some(libc::EEXIST) => "it already exists".to_string(),
        Some(libc::ENOENT) => "no such snapshot".to_string(),
        Some(libc::EAGAIN) => "the snapshot is still pending".to_string(),
        _ => e.to_string(),
    };
    Failure(1, format!("{what}: {why}"))
}

fn create(
    mnt: &Path,
    name: &VolumeName,
    from: Option<&SnapshotRef>,
    size: Option<u64>,
) -> Result<(), Failure> {
    let started = Instant::now();
    let size_now = make_volume(mnt, name, from, size)?;
    let how = match from {
        Some(id) => format!(" from {id}"),
        None => String::new(),
    };
    println!(
        "{name}: created{how}, {} in {:.1} ms",
        ByteSize(size_now),
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

/// Creates volume `name`: `size` bytes of zeros, or an instant copy of snapshot
/// `from` (grown to `size` if given). Returns its size. A volume this fails to fill
/// is removed again.
pub(super) fn make_volume(
    mnt: &Path,
    name: &VolumeName,
    from: Option<&SnapshotRef>,
    size: Option<u64>,
) -> Result<u64, Failure> {
    let path = mnt.join("volumes").join(name.file_name());
    let source = from
        .map(|id| {
            File::open(snapshot_dir(mnt, &id.to_string()).join("volume.img")).map_err(|e| {
                let mut failure = io_failure(&format!("reading snapshot {id}"), &e);
                if id.host().is_some() && e.raw_os_error() == Some(libc::ENOENT) {
                    failure.1.push_str(
                        " (another host's snapshot shows up here once its upload completed, \
                         within the store's poll_seconds)",
                    );
                }
                failure
            })
        })
        .transpose()?;
    let volume = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)
        .map_err(|e| io_failure(&format!("creating volume {name}"), &e))?;
    let filled = match (&source, from) {
        (Some(source), Some(id)) => copy_whole(source, &volume, size)
            .map_err(|e| io_failure(&format!("copying snapshot {id} into volume {name}"), &e)),
        _ => size
            .map(|size| volume.set_len(size))
            .transpose()
            .map(|_| 0)
            .map_err(|e| io_failure(&format!("sizing volume {name}"), &e)),
    };
    match filled {
        Ok(_) => Ok(volume.metadata().map(|m| m.len()).unwrap_or(0)),
        Err(failure) => {
            // The file is this command's own: nothing else can have used it yet.
            let _ = fs::remove_file(&path);
            Err(failure)
        }
    }
}

/// Copies all of `source` into `dest` with `copy_file_range`, then grows `dest` to
/// `size` if asked. Returns the bytes copied.
fn copy_whole(source: &File, dest: &File, size: Option<u64>) -> std::io::Result<u64> {
    let total = source.metadata()?.len();
    if let Some(size) = size
        && size < total
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("--size {size} is smaller than the snapshot ({total} bytes)"),
        ));
    }
    let mut done: u64 = 0;
    while done < total {
        let (mut off_in, mut off_out) = (done as libc::loff_t, done as libc::loff_t);
        // All that is left in one request: the kernel cuts it to what one FUSE
        // request carries and this loop asks again. Shorter requests of its own would
        // give the new volume a size short of the snapshot's after the first one,
        // which ends the sharing there: the rest would be copied byte by byte.
        let want = usize::try_from(total - done).unwrap_or(usize::MAX);
        // SAFETY: both descriptors are open; the offsets are local variables.
        let n = unsafe {
            libc::copy_file_range(
                source.as_raw_fd(),
                &mut off_in,
                dest.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        match n {
            n if n > 0 => done += n as u64,
            0 => break,
            _ => return Err(std::io::Error::last_os_error()),
        }
    }
    if let Some(size) = size {
        dest.set_len(size)?;
    }
    Ok(done)
}

fn list(mnt: &Path) -> Result<(), Failure> {
    let dir = mnt.join("volumes");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .map_err(|e| Failure(1, format!("listing {}: {e}", dir.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<40} {:>12} {:>12}  {:<40} {:>8}",
        "VOLUME", "SIZE", "ALLOCATED", "SOURCE", "HYDRATED"
    );
    for file in names {
        let path = dir.join(&file);
        let name = file.strip_suffix(".img").unwrap_or(&file);
        let Ok(meta) = fs::metadata(&path) else {
            let _ = writeln!(out, "{name:<40} (damaged: cannot stat)");
            continue;
        };
        let attr = |key: &str| {
            get_xattr(&path, key)
                .ok()
                .flatten()
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        let source = attr("user.ebsfs.source");
        let hydrated = match &source {
            Some(_) => attr("user.ebsfs.hydrated").unwrap_or_else(|| "?".into()),
            None => "-".into(),
        };
        let _ = writeln!(
            out,
            "{name:<40} {:>12} {:>12}  {:<40} {hydrated:>8}",
            ByteSize(meta.len()).to_string(),
            ByteSize(meta.blocks() * 512).to_string(),
            source.unwrap_or_else(|| "-".into()),
        );
    }
    Ok(())
}

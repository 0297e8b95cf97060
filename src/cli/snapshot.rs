//! `ebsfs snapshot create|list|wait|delete`: plain file operations on the mount.
//!
//! Every id or volume/label from the command line is checked with the filesystem's
//! own name rules before it is joined onto the mount path: `../x` must never reach
//! `mkdir` or `rmdir` outside `snapshots/`.

use std::ffi::CString;
use std::fs;
use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;

use super::MountLocation;
use crate::names::{NameError, SnapshotName, VolumeName};

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Start a snapshot of VOLUME (mkdir snapshots/VOLUME@LABEL).
    Create {
        volume: String,
        label: String,
        /// Wait until the snapshot is completed, showing progress (and, if the volume
        /// has a snapshot pending, wait for that one first instead of failing).
        #[arg(long)]
        wait: bool,
        /// Stored as the snapshot's user.description.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        location: MountLocation,
    },
    /// List snapshots with their status, size, owner and time.
    List {
        #[command(flatten)]
        location: MountLocation,
    },
    /// Wait for a snapshot (VOLUME@LABEL) to complete; non-zero exit if it fails.
    Wait {
        id: String,
        #[command(flatten)]
        location: MountLocation,
    },
    /// Delete a snapshot (rmdir snapshots/VOLUME@LABEL).
    Delete {
        id: String,
        #[command(flatten)]
        location: MountLocation,
    },
    /// Byte ranges in which snapshot TO differs from FROM, an earlier snapshot it
    /// descends from: `OFFSET LENGTH` lines (bytes), or JSON with --json.
    Diff {
        from: String,
        to: String,
        /// Print `[{"offset": …, "length": …}, …]`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        location: MountLocation,
    },
}

/// A failure to report, with the exit code to use.
pub(super) struct Failure(pub i32, pub String);

pub fn run(cmd: SnapshotCommand) -> i32 {
    match dispatch(cmd) {
        Ok(()) => 0,
        Err(Failure(code, message)) => {
            eprintln!("ebsfs: {message}");
            code
        }
    }
}

fn dispatch(cmd: SnapshotCommand) -> Result<(), Failure> {
    match cmd {
        SnapshotCommand::Create {
            volume,
            label,
            wait,
            description,
            location,
        } => {
            let name = VolumeName::parse(&volume)
                .and_then(|v| SnapshotName::new(v, &label))
                .map_err(|e| invalid_name(&format!("{volume}@{label}"), e))?;
            with_mount(&location, |mnt| {
                create(mnt, &name, description.as_deref(), wait)
            })
        }
        SnapshotCommand::List { location } => with_mount(&location, list),
        SnapshotCommand::Wait { id, location } => {
            let id = parse_id(&id)?.to_string();
            with_mount(&location, |mnt| wait_for(mnt, &id))
        }
        SnapshotCommand::Delete { id, location } => {
            let id = parse_id(&id)?.to_string();
            with_mount(&location, |mnt| delete(mnt, &id))
        }
        SnapshotCommand::Diff {
            from,
            to,
            json,
            location,
        } => {
            let (from, to) = (parse_id(&from)?.to_string(), parse_id(&to)?.to_string());
            with_mount(&location, |mnt| diff(mnt, &from, &to, json))
        }
    }
}

/// `ebsfs snapshot diff FROM TO`: the union of the `changed` files from TO back to
/// FROM (see [`crate::snapshot::diff::diff_along_parents`]).
fn diff(mnt: &Path, from: &str, to: &str, json: bool) -> Result<(), Failure> {
    let read = |id: &str, file: &str| {
        std::fs::read_to_string(snapshot_dir(mnt, id).join(file))
            .map_err(|e| explain(&e, &format!("{id}/{file}")))
    };
    let ranges = crate::snapshot::diff::diff_along_parents(
        from,
        to,
        |id| crate::snapshot::diff::parse_ranges(&read(id, "changed")?),
        |id| {
            let info: toml::Table =
                toml::from_str(&read(id, "info")?).map_err(|e| format!("{id}/info: {e}"))?;
            let parent = Some(info_value(&info, "parent")).filter(|p| !p.is_empty());
            let size = info
                .get("size")
                .and_then(toml::Value::as_integer)
                .ok_or_else(|| format!("{id}/info has no size"))?;
            Ok((parent, size as u64))
        },
    )
    .map_err(|e| Failure(1, e))?;
    let text = if json {
        crate::snapshot::diff::ranges_json(&ranges)
    } else {
        crate::snapshot::diff::render_ranges(&ranges)
    };
    print!("{text}");
    Ok(())
}

/// Refuses a name from the command line (exit status 2, like other usage errors).
fn invalid_name(id: &str, err: NameError) -> Failure {
    Failure(2, format!("invalid snapshot id `{id}`: {err}"))
}

/// A snapshot id from the command line: `VOLUME@LABEL` by the filesystem's name rules.
fn parse_id(id: &str) -> Result<SnapshotName, Failure> {
    SnapshotName::parse(id).map_err(|e| invalid_name(id, e))
}

pub(super) fn with_mount(
    location: &MountLocation,
    f: impl FnOnce(&Path) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mnt = location.resolve_mount().map_err(|e| Failure(2, e))?;
    f(&mnt)
}

pub(super) fn snapshot_dir(mnt: &Path, id: &str) -> PathBuf {
    mnt.join("snapshots").join(id)
}

fn explain(err: &std::io::Error, id: &str) -> String {
    match err.raw_os_error() {
        Some(libc::ENOENT) => format!("{id}: no such volume or snapshot"),
        Some(libc::EEXIST) => format!("{id}: a snapshot with this name already exists"),
        Some(libc::EBUSY) => {
            format!("{id}: the volume already has a snapshot pending; wait for it first")
        }
        Some(libc::EINVAL) => {
            format!("{id}: invalid name (use VOLUME@LABEL, 1-64 of A-Z a-z 0-9 . _ -)")
        }
        Some(libc::ENAMETOOLONG) => {
            format!("{id}: name too long (at most 64 characters each side of @)")
        }
        _ => format!("{id}: {err}"),
    }
}

fn create(
    mnt: &Path,
    name: &SnapshotName,
    description: Option<&str>,
    wait: bool,
) -> Result<(), Failure> {
    let id = name.to_string();
    let dir = snapshot_dir(mnt, &id);
    // With --wait, a snapshot of the volume still pending is waited for first.
    while let Err(e) = fs::create_dir(&dir) {
        let pending = pending_snapshot_of(mnt, name.volume().as_str());
        match (e.raw_os_error(), wait, pending) {
            (Some(libc::EBUSY), true, Some(pending)) => {
                eprintln!("{id}: waiting for {pending} to finish first");
                // Its outcome does not matter here: only that it is no longer pending.
                let _ = wait_for(mnt, &pending);
            }
            (Some(libc::EBUSY), true, None) => std::thread::sleep(Duration::from_millis(100)),
            _ => return Err(Failure(1, explain(&e, &id))),
        }
    }
    if let Some(text) = description {
        set_xattr(&dir, "user.description", text.as_bytes())
            .map_err(|e| Failure(1, format!("{id}: setting description: {e}")))?;
    }
    println!("{id}");
    if wait { wait_for(mnt, &id) } else { Ok(()) }
}

/// The pending snapshot of `volume`, if any.
fn pending_snapshot_of(mnt: &Path, volume: &str) -> Option<String> {
    let prefix = format!("{volume}@");
    snapshot_names(mnt)
        .ok()?
        .into_iter()
        .filter(|name| name.starts_with(&prefix))
        .find(|name| read_field(&snapshot_dir(mnt, name), "status").is_ok_and(|s| s == "pending"))
}

/// The ids in `snapshots/`, in directory order.
pub(super) fn snapshot_names(mnt: &Path) -> std::io::Result<Vec<String>> {
    Ok(fs::read_dir(mnt.join("snapshots"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

/// An extended attribute of `path`, `None` if it has none of that name.
pub(super) fn get_xattr(path: &Path, name: &str) -> std::io::Result<Option<Vec<u8>>> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let c_name = CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated; buf is valid for its length.
    let rc = unsafe {
        libc::getxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if rc >= 0 {
        buf.truncate(rc as usize);
        return Ok(Some(buf));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENODATA) {
        Ok(None)
    } else {
        Err(err)
    }
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let c_name = CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: both strings are NUL-terminated; value is a valid slice for its length.
    let rc = unsafe {
        libc::setxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) fn read_field(dir: &Path, file: &str) -> Result<String, std::io::Error> {
    fs::read_to_string(dir.join(file)).map(|s| s.trim().to_string())
}

pub(super) fn info_value(info: &toml::Table, key: &str) -> String {
    match info.get(key) {
        Some(toml::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

fn list(mnt: &Path) -> Result<(), Failure> {
    let mut names =
        snapshot_names(mnt).map_err(|e| Failure(1, format!("listing snapshots: {e}")))?;
    names.sort();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<40} {:<10} {:>5} {:>12} {:>12} {:>6}  CREATED",
        "SNAPSHOT", "STATUS", "DONE", "SIZE", "STORED", "OWNER"
    );
    for name in names {
        let dir = snapshot_dir(mnt, &name);
        let status = read_field(&dir, "status").unwrap_or_else(|_| "?".into());
        let progress = read_field(&dir, "progress").unwrap_or_default();
        let info: toml::Table = read_field(&dir, "info")
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
            .unwrap_or_default();
        let size = info_value(&info, "size")
            .parse::<u64>()
            .map(|b| crate::config::ByteSize(b).to_string())
            .unwrap_or_default();
        let stored = info_value(&info, "stored_bytes")
            .parse::<u64>()
            .map(|b| crate::config::ByteSize(b).to_string())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{name:<40} {status:<10} {progress:>5} {size:>12} {stored:>12} {:>6}  {}",
            info_value(&info, "owner"),
            info_value(&info, "created")
        );
    }
    Ok(())
}

/// Polls `status` and `progress`: a bar on a terminal, a line per 10% otherwise.
fn wait_for(mnt: &Path, id: &str) -> Result<(), Failure> {
    let dir = snapshot_dir(mnt, id);
    let tty = std::io::stderr().is_terminal();
    let mut last_reported: Option<u64> = None;
    loop {
        let status = read_field(&dir, "status").map_err(|e| Failure(2, explain(&e, id)))?;
        let percent: u64 = read_field(&dir, "progress")
            .ok()
            .and_then(|p| p.trim_end_matches('%').parse().ok())
            .unwrap_or(0);
        if tty {
            let filled = (percent / 5) as usize;
            eprint!(
                "\r{id} [{}{}] {percent:>3}% {status}   ",
                "#".repeat(filled),
                ".".repeat(20 - filled.min(20))
            );
        } else if last_reported
            .is_none_or(|last| percent >= last + 10 || (status != "pending" && percent != last))
        {
            eprintln!("{id}: {status} {percent}%");
            last_reported = Some(percent);
        }
        match status.as_str() {
            "completed" => {
                if tty {
                    eprintln!();
                }
                println!("{id}: completed");
                return Ok(());
            }
            "error" => {
                if tty {
                    eprintln!();
                }
                let info: toml::Table = read_field(&dir, "info")
                    .ok()
                    .and_then(|t| toml::from_str(&t).ok())
                    .unwrap_or_default();
                return Err(Failure(
                    1,
                    format!("{id}: snapshot failed: {}", info_value(&info, "error")),
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn delete(mnt: &Path, id: &str) -> Result<(), Failure> {
    fs::remove_dir(snapshot_dir(mnt, id)).map_err(|e| Failure(1, explain(&e, id)))?;
    println!("{id}: deleted");
    Ok(())
}

//! `ebsfs snapshot create|list|wait|delete`: plain file operations on the mount.
//!
//! Every id or volume/label from the command line is checked with the filesystem's
//! own name rules before it is joined onto the mount path: `../x` must never reach
//! `mkdir` or `rmdir` outside `snapshots/`. Other hosts' snapshots (with a snapshot
//! store) are in `snapshots/` too, as `VOLUME@LABEL@HOST`: `list` shows them, `wait`
//! and `volume create --from` take their names.

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
    /// Start a snapshot of VOLUME (mkdir snapshots/VOLUME@LABEL); of several volumes
    /// at one instant with VOLUME,VOLUME,… (a crash-consistent set: setfattr -n
    /// user.ebsfs.snapshot -v VOLUME,VOLUME@LABEL snapshots).
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
    /// List snapshots with their status, size, owner, time, host and location (with a
    /// snapshot store, other hosts' snapshots too, as VOLUME@LABEL@HOST).
    List {
        #[command(flatten)]
        location: MountLocation,
    },
    /// Wait for a snapshot (VOLUME@LABEL) to complete (with a snapshot store: to be
    /// uploaded); non-zero exit if it fails.
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
    /// Lock a snapshot against deletion, by anyone (root included), until a time in
    /// UTC (setfattr -n user.ebsfs.lock -v TIME snapshots/VOLUME@LABEL). A lock can be
    /// extended, never shortened.
    Lock {
        id: String,
        /// e.g. 2027-01-01T00:00:00Z
        #[arg(long)]
        until: String,
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
    /// Write snapshot ID to standard output as a self-verifying stream, for `ebsfs
    /// snapshot receive` on another data directory: whole, or with --since only what
    /// changed since BASE, an earlier snapshot ID descends from.
    Send {
        id: String,
        /// Send only the changes since this snapshot, which the receiver must have.
        #[arg(long, value_name = "BASE")]
        since: Option<String>,
        #[command(flatten)]
        location: MountLocation,
    },
    /// Recreate the snapshot of a stream from `ebsfs snapshot send` on standard input;
    /// refuses a damaged stream, or an incremental one whose base is not here.
    Receive {
        #[command(flatten)]
        location: MountLocation,
    },
}

/// A failure to report, with the exit code to use.
pub(super) struct Failure(pub i32, pub String);

/// The exit code of a command's outcome, after printing its failure if it failed.
pub(super) fn exit_code(result: Result<(), Failure>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(Failure(code, message)) => {
            eprintln!("ebsfs: {message}");
            code
        }
    }
}

pub fn run(cmd: SnapshotCommand) -> i32 {
    exit_code(dispatch(cmd))
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
            let names = volume
                .split(',')
                .map(|v| {
                    VolumeName::parse(v)
                        .and_then(|v| SnapshotName::new(v, &label))
                        .map_err(|e| invalid_name(&format!("{v}@{label}"), e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            with_mount(&location, |mnt| match names.as_slice() {
                [name] => create(mnt, name, description.as_deref(), wait),
                _ => create_set(mnt, &volume, &label, &names, description.as_deref(), wait),
            })
        }
        SnapshotCommand::List { location } => {
            with_mount(&location, |mnt| list(mnt, &mut std::io::stdout().lock()))
        }
        SnapshotCommand::Wait { id, location } => {
            let id = parse_ref(&id)?.to_string();
            with_mount(&location, |mnt| wait_for(mnt, &id))
        }
        SnapshotCommand::Delete { id, location } => {
            let id = parse_ref(&id)?;
            if let Some(host) = id.host() {
                return Err(Failure(
                    1,
                    format!(
                        "{id}: another host's snapshot, from the snapshot store: only host \
                         {host} may delete it (there: `ebsfs snapshot delete {}`)",
                        id.name
                    ),
                ));
            }
            with_mount(&location, |mnt| delete(mnt, &id.to_string()))
        }
        SnapshotCommand::Lock {
            id,
            until,
            location,
        } => {
            let id = parse_ref(&id)?.to_string();
            with_mount(&location, |mnt| {
                set_xattr(
                    &snapshot_dir(mnt, &id),
                    crate::snapshot::LOCK_XATTR,
                    until.as_bytes(),
                )
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::EINVAL) => Failure(
                        2,
                        format!("{id}: --until takes a time in UTC such as 2027-01-01T00:00:00Z"),
                    ),
                    Some(libc::EPERM) => Failure(
                        1,
                        format!("{id}: not its owner, or already locked until later"),
                    ),
                    _ => Failure(1, explain(&e, &id)),
                })?;
                println!("{id} locked until {until}");
                Ok(())
            })
        }
        SnapshotCommand::Diff {
            from,
            to,
            json,
            location,
        } => {
            let (from, to) = (parse_ref(&from)?.to_string(), parse_ref(&to)?.to_string());
            with_mount(&location, |mnt| diff(mnt, &from, &to, json))
        }
        SnapshotCommand::Send {
            id,
            since,
            location,
        } => {
            let id = local_name(&id)?;
            let since = since.as_deref().map(local_name).transpose()?;
            if std::io::stdout().is_terminal() {
                return Err(Failure(
                    2,
                    "send writes a binary stream: redirect it to a file or pipe it \
                     (ebsfs snapshot send VOL@LABEL | ebsfs snapshot receive)"
                        .into(),
                ));
            }
            with_mount(&location, |mnt| {
                super::send::send(mnt, &id, since.as_ref(), std::io::stdout().lock())
            })
        }
        SnapshotCommand::Receive { location } => {
            if std::io::stdin().is_terminal() {
                return Err(Failure(
                    2,
                    "receive reads a stream from `ebsfs snapshot send` on standard input: \
                     pipe or redirect one in"
                        .into(),
                ));
            }
            with_mount(&location, |mnt| {
                super::send::receive(mnt, std::io::stdin().lock())
            })
        }
    }
}

/// One of this host's snapshots (`VOLUME@LABEL`) from the command line.
fn local_name(id: &str) -> Result<SnapshotName, Failure> {
    let parsed = parse_ref(id)?;
    match parsed.host() {
        Some(host) => Err(Failure(
            2,
            format!("{id}: another host's snapshot: send it from {host}"),
        )),
        None => Ok(parsed.name),
    }
}

/// `ebsfs snapshot diff FROM TO`: the ranges of [`changed_between`].
fn diff(mnt: &Path, from: &str, to: &str, json: bool) -> Result<(), Failure> {
    let ranges = changed_between(mnt, from, to)?;
    let text = if json {
        crate::snapshot::diff::ranges_json(&ranges)
    } else {
        crate::snapshot::diff::render_ranges(&ranges)
    };
    print!("{text}");
    Ok(())
}

/// The byte ranges in which snapshot `to` differs from `from`, an earlier snapshot
/// on its line of parents: the union of the `changed` files from `to` back to `from`
/// (see [`crate::snapshot::diff::diff_along_parents`]).
pub(super) fn changed_between(
    mnt: &Path,
    from: &str,
    to: &str,
) -> Result<Vec<std::ops::Range<u64>>, Failure> {
    let read = |id: &str, file: &str| {
        std::fs::read_to_string(snapshot_dir(mnt, id).join(file))
            .map_err(|e| explain(&e, &format!("{id}/{file}")))
    };
    crate::snapshot::diff::diff_along_parents(
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
    .map_err(|e| Failure(1, e))
}

/// Refuses a name from the command line (exit status 2, like other usage errors).
fn invalid_name(id: &str, err: NameError) -> Failure {
    Failure(2, format!("invalid snapshot id `{id}`: {err}"))
}

/// A snapshot as the mount names it: `VOLUME@LABEL` (this host's), or
/// `VOLUME@LABEL@HOST` (another host's, from the snapshot store; a `~N` after it tells
/// apart two that would have the same name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SnapshotRef {
    pub name: SnapshotName,
    /// The other host, and the `~N` suffix.
    pub foreign: Option<(String, Option<u64>)>,
}

impl SnapshotRef {
    /// Parses `text` by the filesystem's name rules (and `host_id`'s for the host).
    pub fn parse(text: &str) -> Result<SnapshotRef, String> {
        match text.matches('@').count() {
            0 | 1 => SnapshotName::parse(text)
                .map(|name| SnapshotRef {
                    name,
                    foreign: None,
                })
                .map_err(|e| e.to_string()),
            2 => {
                let (local, host) = text.rsplit_once('@').expect("two @");
                let name = SnapshotName::parse(local).map_err(|e| e.to_string())?;
                let (host, suffix) = match host.split_once('~') {
                    Some((host, n)) => {
                        let n = n
                            .parse::<u64>()
                            .ok()
                            .filter(|_| n.bytes().all(|b| b.is_ascii_digit()))
                            .ok_or_else(|| format!("`~{n}` after the host is not `~NUMBER`"))?;
                        (host, Some(n))
                    }
                    None => (host, None),
                };
                crate::config::store::check_host_id(host)?;
                Ok(SnapshotRef {
                    name,
                    foreign: Some((host.to_string(), suffix)),
                })
            }
            _ => Err(format!(
                "`{text}` has too many `@`: name a snapshot VOLUME@LABEL, or VOLUME@LABEL@HOST \
                 for another host's"
            )),
        }
    }

    /// The other host, for another host's snapshot.
    pub fn host(&self) -> Option<&str> {
        self.foreign.as_ref().map(|(host, _)| host.as_str())
    }
}

impl std::fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)?;
        match &self.foreign {
            Some((host, Some(n))) => write!(f, "@{host}~{n}"),
            Some((host, None)) => write!(f, "@{host}"),
            None => Ok(()),
        }
    }
}

/// A snapshot id from the command line, this host's or another's (exit status 2 if
/// it breaks the name rules).
pub(super) fn parse_ref(id: &str) -> Result<SnapshotRef, Failure> {
    SnapshotRef::parse(id).map_err(|e| Failure(2, format!("invalid snapshot id `{id}`: {e}")))
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

pub(super) fn explain(err: &std::io::Error, id: &str) -> String {
    match err.raw_os_error() {
        Some(libc::ENOENT) => format!("{id}: no such volume or snapshot"),
        Some(libc::EEXIST) => format!(
            "{id}: a snapshot with this name already exists (in snapshots/, or in \
             recycle-bin/ until restored or purged)"
        ),
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

/// `snapshot create A,B LABEL`: one set, at one instant, through the `snapshots/`
/// directory's `user.ebsfs.snapshot` attribute.
fn create_set(
    mnt: &Path,
    volumes: &str,
    label: &str,
    names: &[SnapshotName],
    description: Option<&str>,
    wait: bool,
) -> Result<(), Failure> {
    let spec = format!("{volumes}@{label}");
    set_xattr(
        &mnt.join("snapshots"),
        crate::fs::SNAPSHOT_SET_XATTR,
        spec.as_bytes(),
    )
    .map_err(|e| Failure(1, explain(&e, &spec)))?;
    for name in names {
        let id = name.to_string();
        if let Some(text) = description {
            set_xattr(&snapshot_dir(mnt, &id), "user.description", text.as_bytes())
                .map_err(|e| Failure(1, format!("{id}: setting description: {e}")))?;
        }
        println!("{id}");
    }
    if wait {
        for name in names {
            wait_for(mnt, &name.to_string())?;
        }
    }
    Ok(())
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

pub(super) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
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

/// A cell of `list`: a dash when `info` does not have it.
fn cell(text: String) -> String {
    if text.is_empty() {
        "-".to_string()
    } else {
        text
    }
}

/// A snapshot as `list` shows it: its name, `status`, `progress` and parsed `info`.
struct ListRow {
    name: String,
    status: String,
    progress: String,
    info: toml::Table,
}

/// Prints the table of snapshots (`ebsfs snapshot list`). Uploads failing are
/// reported on stderr.
fn list(mnt: &Path, out: &mut dyn Write) -> Result<(), Failure> {
    let mut names =
        snapshot_names(mnt).map_err(|e| Failure(1, format!("listing snapshots: {e}")))?;
    names.sort();
    let rows: Vec<ListRow> = names
        .into_iter()
        .map(|name| {
            let dir = snapshot_dir(mnt, &name);
            ListRow {
                status: read_field(&dir, "status").unwrap_or_else(|_| "?".into()),
                progress: read_field(&dir, "progress").unwrap_or_default(),
                info: read_field(&dir, "info")
                    .ok()
                    .and_then(|t| toml::from_str(&t).ok())
                    .unwrap_or_default(),
                name,
            }
        })
        .collect();
    let _ = out.write_all(list_table(&rows).as_bytes());
    for row in &rows {
        let upload_error = info_value(&row.info, "upload_error");
        if !upload_error.is_empty() {
            eprintln!(
                "{}: not in the snapshot store yet, upload retried: {upload_error}",
                row.name
            );
        }
    }
    Ok(())
}

/// The table `list` prints: columns up to CREATED as in earlier versions, then HOST
/// (the host that took the snapshot) and LOCATION (`local`: in this data directory
/// only; `local+bucket`: also in the snapshot store; `bucket`: another host's, read
/// from the snapshot store), as `info` reports them; a dash for what `info` lacks.
fn list_table(rows: &[ListRow]) -> String {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(40);
    let hosts: Vec<String> = rows
        .iter()
        .map(|r| cell(info_value(&r.info, "host")))
        .collect();
    let host_width = hosts.iter().map(String::len).max().unwrap_or(0).max(16);
    let bytes = |info: &toml::Table, key: &str| {
        info_value(info, key)
            .parse::<u64>()
            .map(|b| crate::config::ByteSize(b).to_string())
            .unwrap_or_default()
    };
    let mut table = format!(
        "{:<width$} {:<10} {:>5} {:>12} {:>12} {:>6}  {:<25} {:<host_width$} LOCATION\n",
        "SNAPSHOT", "STATUS", "DONE", "SIZE", "STORED", "OWNER", "CREATED", "HOST"
    );
    for (row, host) in rows.iter().zip(hosts) {
        let ListRow {
            name,
            status,
            progress,
            info,
        } = row;
        table.push_str(&format!(
            "{name:<width$} {status:<10} {progress:>5} {:>12} {:>12} {:>6}  {:<25} \
             {host:<host_width$} {}\n",
            bytes(info, "size"),
            bytes(info, "stored_bytes"),
            info_value(info, "owner"),
            cell(info_value(info, "created")),
            cell(info_value(info, "location")),
        ));
    }
    table
}

/// Polls `status` and `progress`: a bar on a terminal, a line per 10% otherwise.
pub(super) fn wait_for(mnt: &Path, id: &str) -> Result<(), Failure> {
    let dir = snapshot_dir(mnt, id);
    let tty = std::io::stderr().is_terminal();
    let mut last_reported: Option<u64> = None;
    let mut last_upload_error = String::new();
    loop {
        let status = read_field(&dir, "status").map_err(|e| Failure(2, explain(&e, id)))?;
        if status == "pending" {
            // Captured but not in the snapshot store yet: say why, once per reason.
            let upload_error = read_field(&dir, "info")
                .ok()
                .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
                .map(|info| info_value(&info, "upload_error"))
                .unwrap_or_default();
            if !upload_error.is_empty() && upload_error != last_upload_error {
                if tty {
                    eprintln!();
                }
                eprintln!("{id}: upload to the snapshot store failed, retrying: {upload_error}");
            }
            last_upload_error = upload_error;
        }
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
    if mnt.join(super::recycle_bin::DIR).join(id).is_dir() {
        println!("{id}: moved to the recycle bin (ebsfs recycle-bin restore {id} brings it back)");
    } else {
        println!("{id}: deleted");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, status: &str, info: &str) -> ListRow {
        ListRow {
            name: name.to_string(),
            status: status.to_string(),
            progress: "100%".to_string(),
            info: toml::from_str(info).unwrap(),
        }
    }

    /// The words of the line of `table` that starts with `name`.
    fn line_of(table: &str, name: &str) -> Vec<String> {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no line for {name}:\n{table}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn list_shows_each_snapshots_host_and_location() {
        let table = list_table(&[
            row(
                "db@one",
                "completed",
                "size = 1073741824\nstored_bytes = 4096\nowner = 0\n\
                 created = \"2026-01-02T03:04:05+00:00\"\nhost = \"hosta\"\n\
                 location = \"local+bucket\"\n",
            ),
            row(
                "db@two",
                "pending",
                "owner = 1000\nhost = \"hosta\"\nlocation = \"local\"\n",
            ),
            row(
                "db@one@a-host-with-a-rather-long-id",
                "completed",
                "owner = 0\nhost = \"a-host-with-a-rather-long-id\"\nlocation = \"bucket\"\n",
            ),
            row("old@x", "completed", "owner = 0\n"),
        ]);
        let header = line_of(&table, "SNAPSHOT");
        assert_eq!(
            header,
            [
                "SNAPSHOT", "STATUS", "DONE", "SIZE", "STORED", "OWNER", "CREATED", "HOST",
                "LOCATION"
            ]
        );
        let one = line_of(&table, "db@one");
        assert_eq!(one[1], "completed");
        assert_eq!(one[3..5], ["1.0", "GiB"]);
        assert_eq!(
            one[one.len() - 3..],
            ["2026-01-02T03:04:05+00:00", "hosta", "local+bucket"],
            "{table}"
        );
        let two = line_of(&table, "db@two");
        assert_eq!(two[two.len() - 3..], ["-", "hosta", "local"], "{table}");
        let foreign = line_of(&table, "db@one@a-host-with-a-rather-long-id");
        assert_eq!(
            foreign[foreign.len() - 2..],
            ["a-host-with-a-rather-long-id", "bucket"],
            "{table}"
        );
        // An info without host and location (an older ebsfs): dashes.
        let old = line_of(&table, "old@x");
        assert_eq!(old[old.len() - 3..], ["-", "-", "-"], "{table}");
        // Columns line up, a long host id included.
        let at = |line: &str, word: &str| line.find(word).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(at(lines[0], "LOCATION"), at(lines[3], "bucket"), "{table}");
        assert_eq!(
            at(lines[0], "LOCATION"),
            at(lines[1], "local+bucket"),
            "{table}"
        );
        assert_eq!(at(lines[0], "HOST"), at(lines[2], "hosta"), "{table}");
    }

    #[test]
    fn snapshot_refs_name_this_hosts_snapshots_and_other_hosts() {
        let own = SnapshotRef::parse("db@one").unwrap();
        assert_eq!((own.host(), own.to_string().as_str()), (None, "db@one"));
        let foreign = SnapshotRef::parse("db@one@hosta").unwrap();
        assert_eq!(foreign.host(), Some("hosta"));
        assert_eq!(foreign.name.to_string(), "db@one");
        assert_eq!(foreign.to_string(), "db@one@hosta");
        let twin = SnapshotRef::parse("db@one@hosta~3").unwrap();
        assert_eq!(twin.foreign, Some(("hosta".to_string(), Some(3))));
        assert_eq!(twin.to_string(), "db@one@hosta~3");
        for bad in [
            "db",
            "db@one@",
            "db@one@host/x",
            "db@one@hosta~",
            "db@one@hosta~x",
            "db@one@hosta~+1",
            "a@b@c@d",
            "../x@y",
        ] {
            assert!(SnapshotRef::parse(bad).is_err(), "{bad} was accepted");
        }
        assert_eq!(parse_ref("a@b@c@d").unwrap_err().0, 2);
    }
}

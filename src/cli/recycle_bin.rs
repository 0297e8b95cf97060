//! `ebsfs recycle-bin list|restore|purge`: `ls`, `mv` and `rmdir` on the mount's
//! `recycle-bin/` directory.

use std::fs;
use std::path::Path;

use clap::Subcommand;

use super::MountLocation;
use super::snapshot::{Failure, exit_code, explain, info_value, parse_ref, read_field, with_mount};

/// The recycle bin's directory at the top of the mount.
pub const DIR: &str = crate::fs::inode::RECYCLE_BIN;

#[derive(Subcommand, Debug)]
pub enum BinCommand {
    /// List the snapshots in the recycle bin, with when they were deleted and when
    /// they are purged (ls recycle-bin).
    List {
        #[command(flatten)]
        location: MountLocation,
    },
    /// Bring a snapshot back, as it was (mv recycle-bin/VOLUME@LABEL snapshots/).
    Restore {
        id: String,
        #[command(flatten)]
        location: MountLocation,
    },
    /// Delete a snapshot in the recycle bin for good, now (rmdir
    /// recycle-bin/VOLUME@LABEL).
    Purge {
        id: String,
        #[command(flatten)]
        location: MountLocation,
    },
}

pub fn run(cmd: BinCommand) -> i32 {
    exit_code(dispatch(cmd))
}

fn dispatch(cmd: BinCommand) -> Result<(), Failure> {
    match cmd {
        BinCommand::List { location } => with_mount(&location, |mnt| {
            print!("{}", list(&bin_dir(mnt)?)?);
            Ok(())
        }),
        BinCommand::Restore { id, location } => {
            let id = parse_ref(&id)?.to_string();
            with_mount(&location, |mnt| {
                fs::rename(bin_dir(mnt)?.join(&id), mnt.join("snapshots").join(&id))
                    .map_err(|e| Failure(1, explain_bin(&e, &id)))?;
                println!("{id}: restored");
                Ok(())
            })
        }
        BinCommand::Purge { id, location } => {
            let id = parse_ref(&id)?.to_string();
            with_mount(&location, |mnt| {
                fs::remove_dir(bin_dir(mnt)?.join(&id))
                    .map_err(|e| Failure(1, explain_bin(&e, &id)))?;
                println!("{id}: purged");
                Ok(())
            })
        }
    }
}

/// `recycle-bin/` of the mount, or why there is none.
fn bin_dir(mnt: &Path) -> Result<std::path::PathBuf, Failure> {
    let dir = mnt.join(DIR);
    if !dir.is_dir() {
        return Err(Failure(
            1,
            format!(
                "{} has no recycle bin: set recycle_bin (e.g. \"7d\") in the config",
                mnt.display()
            ),
        ));
    }
    Ok(dir)
}

fn explain_bin(err: &std::io::Error, id: &str) -> String {
    match err.raw_os_error() {
        Some(libc::ENOENT) => format!("{id}: not in the recycle bin"),
        Some(libc::EPERM | libc::EACCES) => format!("{id}: only its owner may do this"),
        _ => explain(err, id),
    }
}

/// The table `list` prints: one line per snapshot, oldest deletion first.
fn list(dir: &Path) -> Result<String, Failure> {
    let mut rows = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| Failure(1, format!("listing {DIR}: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| Failure(1, format!("listing {DIR}: {e}")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let info: toml::Table = read_field(&entry.path(), "info")
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
            .unwrap_or_default();
        let field = |key: &str| Some(info_value(&info, key)).filter(|v| !v.is_empty());
        rows.push([
            name,
            field("deleted").unwrap_or_else(|| "-".into()),
            field("purge_after").unwrap_or_else(|| "kept until purged".into()),
            field("size")
                .and_then(|s| s.parse().ok())
                .map_or_else(|| "-".into(), |b| crate::config::ByteSize(b).to_string()),
        ]);
    }
    rows.sort_by(|a, b| (&a[1], &a[0]).cmp(&(&b[1], &b[0])));
    let width = rows.iter().map(|r| r[0].len()).max().unwrap_or(0).max(40);
    let mut table = format!(
        "{:<width$} {:<30} {:<30} {:>12}\n",
        "SNAPSHOT", "DELETED", "PURGE AFTER", "SIZE"
    );
    for [name, deleted, purge, size] in rows {
        table.push_str(&format!(
            "{name:<width$} {deleted:<30} {purge:<30} {size:>12}\n"
        ));
    }
    Ok(table)
}

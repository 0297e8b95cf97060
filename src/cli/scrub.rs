//! `ebsfs scrub`: reads every completed snapshot's `volume.img` through the mount (see
//! [`crate::check::scrub`]), with progress on stderr and one result line per snapshot
//! on stdout.

use std::io::IsTerminal;
use std::path::Path;

use super::MountLocation;
use super::snapshot::{info_value, read_field, snapshot_dir, snapshot_names};
use crate::check::scrub::{ImageScrub, scrub_image};
use crate::check::{EXIT_CLEAN, EXIT_CORRUPTION, EXIT_ERROR};
use crate::config::ByteSize;

const AFTER_HELP: &str = "\
Every read of a snapshot image makes the daemon check the hash of each chunk it
reads, so reading each image in full verifies every chunk a snapshot needs.
Pending snapshots and snapshots in error have no image and are skipped.

Exit status:
  0  every snapshot read back
  1  scrub could not run (no ebsfs mount there, a usage error)
  2  some snapshot had reads that failed (each is listed with its byte ranges)";

#[derive(clap::Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct ScrubArgs {
    #[command(flatten)]
    location: MountLocation,
}

/// A snapshot to read, with what its `info` says.
struct Target {
    name: String,
    size_bytes: u64,
    block_size: u64,
}

pub fn run(args: ScrubArgs) -> i32 {
    let mnt = match args.location.resolve_mount() {
        Ok(mnt) => mnt,
        Err(e) => {
            eprintln!("ebsfs scrub: {e}");
            return EXIT_ERROR;
        }
    };
    let mut names = match snapshot_names(&mnt) {
        Ok(names) => names,
        Err(e) => {
            eprintln!("ebsfs scrub: listing snapshots: {e}");
            return EXIT_ERROR;
        }
    };
    names.sort();
    let targets: Vec<Target> = names.iter().filter_map(|n| target(&mnt, n)).collect();
    let total: u64 = targets.iter().map(|t| t.size_bytes).sum();
    let tty = std::io::stderr().is_terminal();
    let mut before = 0;
    let (mut failed, mut skipped) = (0, names.len() - targets.len());
    for t in &targets {
        let image = snapshot_dir(&mnt, &t.name).join("volume.img");
        let mut show = |done: u64| {
            if tty {
                eprint!(
                    "\r{} / {} {}   ",
                    ByteSize(before + done),
                    ByteSize(total),
                    t.name
                );
            }
        };
        let result = scrub_image(&image, t.block_size, &mut show);
        before += t.size_bytes;
        if tty {
            eprintln!();
        }
        eprintln!(
            "{} / {} read: {}",
            ByteSize(before),
            ByteSize(total),
            t.name
        );
        match verdict(&t.name, result) {
            Verdict::Ok => {}
            Verdict::Failed => failed += 1,
            Verdict::Skipped => skipped += 1,
        }
    }
    println!(
        "{} read, {failed} failed, {skipped} skipped",
        crate::check::counted((names.len() - skipped) as u64, "snapshot")
    );
    if failed > 0 {
        EXIT_CORRUPTION
    } else {
        EXIT_CLEAN
    }
}

enum Verdict {
    Ok,
    Failed,
    Skipped,
}

/// Prints the result line of snapshot `name`.
fn verdict(name: &str, result: std::io::Result<ImageScrub>) -> Verdict {
    match result {
        Ok(scrub) if scrub.failed.is_empty() => {
            println!("{name}: OK");
            Verdict::Ok
        }
        Ok(scrub) => {
            let ranges: Vec<String> = scrub
                .failed
                .iter()
                .map(|(start, end)| format!("{start}..{end}"))
                .collect();
            println!(
                "{name}: FAILED: reads failed with EIO at bytes {}",
                ranges.join(", ")
            );
            Verdict::Failed
        }
        // Another user's private snapshot, or one deleted meanwhile.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound
            ) =>
        {
            println!("{name}: skipped ({e})");
            Verdict::Skipped
        }
        Err(e) => {
            println!("{name}: FAILED: {e}");
            Verdict::Failed
        }
    }
}

/// The snapshot `name` if it has an image to read; says why not otherwise.
fn target(mnt: &Path, name: &str) -> Option<Target> {
    let dir = snapshot_dir(mnt, name);
    let status = read_field(&dir, "status").unwrap_or_else(|e| e.to_string());
    if status != "completed" {
        println!("{name}: skipped ({status})");
        return None;
    }
    let info: toml::Table = read_field(&dir, "info")
        .ok()
        .and_then(|t| toml::from_str(&t).ok())
        .unwrap_or_default();
    let number = |key| info_value(&info, key).parse::<u64>().ok();
    Some(Target {
        name: name.to_string(),
        size_bytes: number("size").unwrap_or(0),
        block_size: number("block_size").unwrap_or(4096),
    })
}

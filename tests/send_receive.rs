//! `ebsfs snapshot send` / `receive` between two daemons with their own data
//! directories: full and incremental round trips are bit-for-bit, an incremental
//! receive stores only the change, a damaged or cut stream leaves nothing behind,
//! and an incremental stream is applied only onto the very snapshot it was made
//! against. The identity a received snapshot keeps goes no further than it should.

mod common;
mod snapshot_support;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;
use snapshot_support::*;

/// `ebsfs snapshot send ARGS --mount MNT`, its stream to `stdout`.
fn try_send(fs: &Ebsfs, args: &[&str], stdout: impl Into<Stdio>) -> Output {
    Command::new(BIN)
        .args(["snapshot", "send"])
        .args(args)
        .args(["--mount", &path_str(&fs.mnt)])
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// `ebsfs snapshot send ARGS --mount MNT > stream`, which must succeed.
fn send(fs: &Ebsfs, args: &[&str], stream: &Path) -> Output {
    let out = try_send(fs, args, File::create(stream).unwrap());
    assert!(
        out.status.success(),
        "send {args:?}: {}",
        describe_output(&out)
    );
    out
}

/// `ebsfs snapshot receive --mount MNT < stream`.
fn receive(fs: &Ebsfs, stream: &Path) -> Output {
    Command::new(BIN)
        .args(["snapshot", "receive", "--mount", &path_str(&fs.mnt)])
        .stdin(File::open(stream).unwrap())
        .output()
        .unwrap()
}

#[track_caller]
fn assert_refused(out: &Output, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(says),
        "expected a refusal saying {says:?}: {}",
        describe_output(out)
    );
}

/// The `identity = …` line of a stream's header.
fn stream_identity(stream: &Path) -> String {
    let bytes = fs::read(stream).unwrap();
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&bytes[16..16 + len]).into_owned();
    header
        .lines()
        .find(|l| l.starts_with("identity"))
        .unwrap_or_else(|| panic!("no identity in the header:\n{header}"))
        .to_string()
}

/// Nothing of `id` or its working volume is left on `fs`.
#[track_caller]
fn assert_nothing_left(fs: &Ebsfs, id: &str, volume: &str) {
    assert!(!fs.snapshot(id).exists(), "{id} was left behind");
    assert!(
        !fs.volume(volume).exists(),
        "volume {volume} was left behind"
    );
}

fn flip_byte(stream: &Path, at: usize, name: &str) -> PathBuf {
    let mut bytes = fs::read(stream).unwrap();
    bytes[at] ^= 0x20;
    let bad = stream.with_file_name(name);
    fs::write(&bad, bytes).unwrap();
    bad
}

#[test]
fn full_and_incremental_streams_recreate_snapshots_in_another_data_directory() {
    if !require_fuse() {
        return;
    }
    let a = Ebsfs::start();
    let b = Ebsfs::start();
    random_volume(&a, "db", 64, 0, 24);
    set_xattr(&a.volume("db"), "user.tag", b"blue").unwrap();
    take_snapshot(&a, "db@a");
    set_xattr(&a.snapshot("db@a"), "user.description", b"first").unwrap();

    // Full, through a pipe: the shell form.
    sh(&format!(
        "{BIN} snapshot send db@a --mount {} | {BIN} snapshot receive --mount {}",
        a.mnt.display(),
        b.mnt.display()
    ));
    assert_eq!(b.status("db@a"), "completed");
    assert_eq!(sha256(&image(&b, "db@a")), sha256(&image(&a, "db@a")));
    assert!(!b.volume("db").exists(), "the working volume stays");
    assert_eq!(get_xattr(&b.snapshot("db@a"), "user.tag").unwrap(), b"blue");
    assert_eq!(
        info_str(&b, "db@a", "description").as_deref(),
        Some("first")
    );
    // Zero blocks were neither sent nor stored.
    let full = a.scratch("full.stream");
    send(&a, &["db@a"], &full);
    let full_len = fs::metadata(&full).unwrap().len();
    assert!(
        full_len < 26 * MIB,
        "a full stream of 24 MiB of data is {full_len} bytes"
    );
    assert!(b.info_u64("db@a", "stored_bytes") < 26 * MIB);

    // Change 1 MiB, zero 2 MiB of data, grow by 1 MiB.
    write_urandom(&a.volume("db"), 40, 1);
    let file = fs::OpenOptions::new()
        .write(true)
        .open(a.volume("db"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![0u8; 2 << 20], 4 * MIB).unwrap();
    file.set_len(65 * MIB).unwrap();
    file.sync_all().unwrap();
    drop(file);
    take_snapshot(&a, "db@b");
    let incremental = a.scratch("incremental.stream");
    send(&a, &["db@b", "--since", "db@a"], &incremental);
    let len = fs::metadata(&incremental).unwrap().len();
    assert!(
        len < 2 * MIB,
        "an incremental stream of 1 MiB of data is {len} bytes"
    );

    // Damaged or cut short: refused, and nothing is left.
    let bad = flip_byte(&incremental, len as usize / 2, "flipped.stream");
    assert_refused(&receive(&b, &bad), "stream damaged");
    assert_nothing_left(&b, "db@b", "db");
    let cut = a.scratch("cut.stream");
    fs::write(&cut, &fs::read(&incremental).unwrap()[..len as usize - 40]).unwrap();
    assert_refused(&receive(&b, &cut), "stream truncated");
    assert_nothing_left(&b, "db@b", "db");
    let bad_full = flip_byte(&full, 100, "flipped-full.stream");
    let c = Ebsfs::start();
    assert_refused(&receive(&c, &bad_full), "stream damaged");
    assert_nothing_left(&c, "db@a", "db");
    assert!(listed_snapshots(&c).is_empty());

    let out = receive(&b, &incremental);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(sha256(&image(&b, "db@b")), sha256(&image(&a, "db@b")));
    assert_eq!(info_str(&b, "db@b", "parent").as_deref(), Some("db@a"));
    let stored = b.info_u64("db@b", "stored_bytes");
    eprintln!(
        "{}stream {len} bytes, stored {stored} bytes on the receiver",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stored < 2 * MIB,
        "the incremental snapshot stored {stored} bytes for a 1 MiB change"
    );
    assert!(!b.volume("db").exists());
    // Received twice: refused.
    assert_refused(&receive(&b, &incremental), "already exists");

    // A received snapshot is sent on with the identity it came with.
    let onward = b.scratch("onward.stream");
    send(&b, &["db@b", "--since", "db@a"], &onward);
    assert_eq!(stream_identity(&onward), stream_identity(&incremental));
    assert!(
        String::from_utf8_lossy(&get_xattr(&b.snapshot("db@b"), "user.ebsfs.origin").unwrap())
            .len()
            == 64
    );

    // The identity stays with the received snapshot: volumes refuse it, and a
    // volume made from the snapshot does not pass it on.
    run(
        BIN,
        &[
            "volume",
            "create",
            "copy",
            "--from",
            "db@b",
            "--mount",
            &path_str(&b.mnt),
        ],
    );
    assert_errno(
        "setfattr user.ebsfs.origin on a volume",
        set_xattr(&b.volume("copy"), "user.ebsfs.origin", &[b'a'; 64]),
        libc::EPERM,
    );
    take_snapshot(&b, "copy@x");
    assert!(
        !list_xattr(&b.snapshot("copy@x"))
            .unwrap()
            .iter()
            .any(|n| n == "user.ebsfs.origin")
    );
    let copy_stream = b.scratch("copy.stream");
    send(&b, &["copy@x", "--since", "db@b"], &copy_stream);
    assert_ne!(stream_identity(&copy_stream), stream_identity(&incremental));
}

#[test]
fn an_incremental_stream_needs_the_very_snapshot_it_was_made_against() {
    if !require_fuse() {
        return;
    }
    let a = Ebsfs::start();
    let b = Ebsfs::start();
    random_volume(&a, "db", 16, 0, 4);
    take_snapshot(&a, "db@a");
    write_urandom(&a.volume("db"), 8, 1);
    take_snapshot(&a, "db@b");
    let incremental = a.scratch("incremental.stream");
    send(&a, &["db@b", "--since", "db@a"], &incremental);

    assert_refused(&receive(&b, &incremental), "base db@a missing");
    assert_nothing_left(&b, "db@b", "db");

    // A db@a of B's own: the same name, another snapshot.
    random_volume(&b, "db", 16, 0, 4);
    take_snapshot(&b, "db@a");
    assert_refused(&receive(&b, &incremental), "a volume named db exists here");
    fs::remove_file(b.volume("db")).unwrap();
    assert_refused(
        &receive(&b, &incremental),
        "db@a here is a different snapshot",
    );
    assert_nothing_left(&b, "db@b", "db");

    // send refuses a base that is not an ancestor, and a snapshot that is not there.
    let out = try_send(&a, &["db@a", "--since", "db@b"], Stdio::null());
    assert_refused(&out, "is not an earlier snapshot of db@a");
    let out = try_send(&a, &["db@none"], Stdio::null());
    assert_refused(&out, "db@none");
}

/// Ctrl-C (SIGINT) of a receive waiting for the rest of its stream: it stops, says
/// so, and removes its working volume; the same stream then goes through.
#[test]
fn an_interrupted_receive_leaves_nothing_behind() {
    if !require_fuse() {
        return;
    }
    let a = Ebsfs::start();
    let b = Ebsfs::start();
    random_volume(&a, "db", 16, 0, 8);
    take_snapshot(&a, "db@a");
    let full = a.scratch("full.stream");
    send(&a, &["db@a"], &full);
    let bytes = fs::read(&full).unwrap();

    let mut child = Command::new(BIN)
        .args(["snapshot", "receive", "--mount", &path_str(&b.mnt)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, &bytes[..bytes.len() / 2]).unwrap();
    wait_until(
        "the working volume",
        std::time::Duration::from_secs(30),
        || b.volume("db").exists(),
    );
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_refused(&out, "interrupted by a signal");
    assert_nothing_left(&b, "db@a", "db");

    let out = receive(&b, &full);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(sha256(&image(&b, "db@a")), sha256(&image(&a, "db@a")));
}

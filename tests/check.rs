//! `ebsfs check` on real data directories made by a real daemon, then damaged on disk;
//! `ebsfs scrub` on a live mount. After every `--repair` the directory must mount and
//! a second check must find no leaks.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use ebsfs::namespace::tables::{CHUNKS, MANIFEST};
use ebsfs::namespace::{Namespace, NsResult, SnapshotId, VolumeId};
use ebsfs::snapshot::manifest::{self, BlockContent};
use ebsfs::storage::linux::LinuxStorage;
use ebsfs::store::codec::ChunkHash;
use ebsfs::store::index::{self, ChunkLocation};

const BLOCK: u64 = 64 << 10;
const BLOCKS: u64 = 16;
/// The block `db@two` rewrote: only `db@two` reads its new chunk.
const REWRITTEN: u64 = 3;

/// A stopped daemon's data directory: volume `db` (16 blocks of pattern 1), snapshot
/// `db@one`, block 3 rewritten (pattern 2), snapshot `db@two`.
fn stopped_with_snapshots() -> Ebsfs {
    let mut fs = Ebsfs::start();
    let volume = fs.volume("db");
    fs::write(&volume, pattern((BLOCKS * BLOCK) as usize, 1)).unwrap();
    take_snapshot(&fs, "db@one");
    let file = fs::OpenOptions::new().write(true).open(&volume).unwrap();
    file.write_all_at(&pattern(BLOCK as usize, 2), REWRITTEN * BLOCK)
        .unwrap();
    drop(file);
    take_snapshot(&fs, "db@two");
    fs.stop();
    fs
}

fn take_snapshot(fs: &Ebsfs, id: &str) {
    fs::create_dir(fs.snapshot(id)).unwrap();
    assert_eq!(fs.wait_snapshot(id), "completed", "{}", fs.log());
}

fn check(data: &Path, repair: bool) -> Output {
    let mut args = vec![OsStr::new("check"), data.as_os_str()];
    if repair {
        args.push(OsStr::new("--repair"));
    }
    try_run(BIN, &args)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_exit(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "{}", describe_output(out));
}

/// `check --repair`, then a mount and a clean stop, then a second check: returns the
/// repair's output and the second check's.
fn repair_mount_recheck(fs: &mut Ebsfs) -> (Output, Output) {
    let repaired = check(&fs.data, true);
    fs.restart();
    fs.stop();
    (repaired, check(&fs.data, false))
}

fn with_ns<T>(data: &Path, f: impl FnOnce(&Namespace) -> T) -> T {
    let ns = Namespace::open(&LinuxStorage, &data.join("ebsfs.redb"), false).unwrap();
    f(&ns)
}

/// Where the chunk block `block` of snapshot `snapshot` reads lies.
fn chunk_of(data: &Path, snapshot: &str, block: u64) -> (ChunkHash, ChunkLocation) {
    with_ns(data, |ns| {
        let id: SnapshotId = ns.view().snapshot_id(snapshot).unwrap();
        let txn = ns.read().unwrap();
        let content =
            manifest::resolve(&txn.open_table(MANIFEST).unwrap(), VolumeId(1), block, id).unwrap();
        let BlockContent::Chunk(hash) = content else {
            panic!("block {block} of {snapshot} is zero");
        };
        let chunks = txn.open_table(CHUNKS).unwrap();
        (hash, index::lookup(&chunks, &hash).unwrap().unwrap().0)
    })
}

fn pack_path(data: &Path, id: u32) -> PathBuf {
    data.join("chunks").join(format!("pack-{id:08}.dat"))
}

fn flip_byte(path: &Path, offset: u64) {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x20], offset).unwrap();
}

#[test]
fn a_flipped_chunk_byte_is_corruption_naming_the_snapshot_that_reads_it() {
    if !require_fuse() {
        return;
    }
    let mut fs = stopped_with_snapshots();
    let healthy = check(&fs.data, false);
    assert_exit(&healthy, 0);
    assert!(
        stdout(&healthy).contains("no problems found"),
        "{}",
        describe_output(&healthy)
    );
    let (hash, loc) = chunk_of(&fs.data, "db@two", REWRITTEN);
    flip_byte(&pack_path(&fs.data, loc.pack), loc.offset + 1000);
    let out = check(&fs.data, false);
    assert_exit(&out, 2);
    let line = stdout(&out)
        .lines()
        .find(|l| l.contains(&hash.to_string()))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{}", describe_output(&out)));
    assert!(line.starts_with("corruption:"), "{line}");
    assert!(line.contains("fails its hash check"), "{line}");
    assert!(line.ends_with("read by db@two"), "{line}");
    let (repaired, again) = repair_mount_recheck(&mut fs);
    assert_exit(&repaired, 2);
    assert!(
        stdout(&repaired).contains("not repaired"),
        "{}",
        describe_output(&repaired)
    );
    assert_exit(&again, 2);
    assert!(
        !stdout(&again).contains("leak:"),
        "{}",
        describe_output(&again)
    );
}

#[test]
fn a_missing_pack_is_corruption() {
    if !require_fuse() {
        return;
    }
    let mut fs = stopped_with_snapshots();
    fs::remove_file(pack_path(&fs.data, 1)).unwrap();
    let out = check(&fs.data, false);
    assert_exit(&out, 2);
    assert!(
        stdout(&out).contains("pack 1 (chunks/pack-00000001.dat): the pack file is missing"),
        "{}",
        describe_output(&out)
    );
    assert!(
        stdout(&out).contains("read by db@one, db@two"),
        "{}",
        describe_output(&out)
    );
    let (repaired, again) = repair_mount_recheck(&mut fs);
    assert_exit(&repaired, 2);
    assert_exit(&again, 2);
}

#[test]
fn a_truncated_pack_is_corruption() {
    if !require_fuse() {
        return;
    }
    let mut fs = stopped_with_snapshots();
    let (_, loc) = chunk_of(&fs.data, "db@two", REWRITTEN);
    let pack = fs::OpenOptions::new()
        .write(true)
        .open(pack_path(&fs.data, loc.pack))
        .unwrap();
    pack.set_len(loc.offset).unwrap();
    drop(pack);
    let out = check(&fs.data, false);
    assert_exit(&out, 2);
    assert!(
        stdout(&out).contains("were committed"),
        "{}",
        describe_output(&out)
    );
    assert!(
        stdout(&out).contains("read by db@two"),
        "{}",
        describe_output(&out)
    );
    let (repaired, again) = repair_mount_recheck(&mut fs);
    assert_exit(&repaired, 2);
    assert_exit(&again, 2);
    assert!(
        !stdout(&again).contains("leak:"),
        "{}",
        describe_output(&again)
    );
}

#[test]
fn a_dangling_manifest_reference_is_corruption_and_its_snapshot_can_still_be_deleted() {
    if !require_fuse() {
        return;
    }
    let mut fs = stopped_with_snapshots();
    let (hash, _) = chunk_of(&fs.data, "db@one", 0);
    with_ns(&fs.data, |ns| {
        ns.change_data(|d| -> NsResult<()> {
            d.txn().open_table(CHUNKS)?.remove(&hash.0)?;
            Ok(())
        })
        .unwrap()
    });
    let out = check(&fs.data, false);
    assert_exit(&out, 2);
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "corruption: chunk {hash}: named by 1 manifest entry,"
        )),
        "{text}"
    );
    assert!(text.contains("read by db@one, db@two"), "{text}");
    let (repaired, again) = repair_mount_recheck(&mut fs);
    assert_exit(&repaired, 2);
    assert_exit(&again, 2);
    assert!(
        !stdout(&again).contains("leak:"),
        "{}",
        describe_output(&again)
    );
    // Deleting a snapshot that names the lost chunk settles and mounts again.
    fs.restart();
    fs::remove_dir(fs.snapshot("db@one")).unwrap();
    fs.stop();
    fs.restart();
    assert!(fs.snapshot("db@two").join("volume.img").exists());
    fs.stop();
}

#[test]
fn leaked_pack_space_is_a_leak_and_repair_gives_it_back() {
    if !require_fuse() {
        return;
    }
    let mut fs = stopped_with_snapshots();
    let pack = pack_path(&fs.data, 1);
    let committed = fs::metadata(&pack).unwrap().len();
    // What crashes leave: a chunk a deletion freed in a commit whose punch never ran
    // (committed, no row), then a chunk of a capture that never committed (past the
    // committed length).
    let file = fs::OpenOptions::new().write(true).open(&pack).unwrap();
    file.write_all_at(&pattern(2 * BLOCK as usize, 7), committed)
        .unwrap();
    file.sync_all().unwrap();
    drop(file);
    with_ns(&fs.data, |ns| {
        ns.change_data(|d| d.set_pack_len(1, committed + BLOCK))
    })
    .unwrap();
    let before = du_bytes(&pack);
    let out = check(&fs.data, false);
    assert_exit(&out, 3);
    let text = stdout(&out);
    assert!(
        text.contains("leak: pack 1: 64.0 KiB past its committed length"),
        "{text}"
    );
    assert!(
        text.contains("leak: pack 1: 64.0 KiB in 1 range "),
        "{text}"
    );
    let (repaired, again) = repair_mount_recheck(&mut fs);
    assert_exit(&repaired, 0);
    assert_exit(&again, 0);
    assert_eq!(fs::metadata(&pack).unwrap().len(), committed + BLOCK);
    assert_eq!(du_bytes(&pack), before - 2 * BLOCK);
}

#[test]
fn a_daemon_killed_during_a_capture_leaves_leaks_only() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let volume = fs.volume("db");
    let size = 256 << 20;
    fs::write(&volume, pattern(size, 1)).unwrap();
    take_snapshot(&fs, "db@one");
    // Rewrite everything and kill the daemon while the capture is under way.
    fs::write(&volume, pattern(size, 2)).unwrap();
    fs::create_dir(fs.snapshot("db@two")).unwrap();
    wait_until(
        "the capture to start",
        std::time::Duration::from_secs(60),
        || {
            fs::read_to_string(fs.snapshot("db@two").join("progress"))
                .is_ok_and(|p| p.trim() != "0%")
        },
    );
    fs.kill9();
    let out = check(&fs.data, false);
    // An interrupted capture leaves its uncommitted chunks and its files: leaks, never
    // corruption (unless it completed before the kill: then nothing at all).
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}",
        describe_output(&out)
    );
    let (repaired, again) = repair_mount_recheck(&mut fs);
    assert_exit(&repaired, 0);
    assert_exit(&again, 0);
    fs.restart();
    take_snapshot(&fs, "db@three");
    assert_eq!(
        sha256(&fs.snapshot("db@three").join("volume.img")),
        sha256(&volume)
    );
    fs.stop();
    assert_exit(&check(&fs.data, false), 0);
}

#[test]
fn an_orphan_file_is_a_leak_and_repair_moves_it_to_lost_found() {
    if !require_fuse() {
        return;
    }
    let mut fs = stopped_with_snapshots();
    let orphans = [
        fs.data.join("volumes").join("42.raw"),
        fs.data.join("chunks").join("pack-00000009.dat"),
    ];
    for (i, path) in orphans.iter().enumerate() {
        fs::write(path, pattern(5000, i as u64)).unwrap();
    }
    let out = check(&fs.data, false);
    assert_exit(&out, 3);
    assert!(
        stdout(&out).contains("leak: volumes/42.raw: it belongs to no volume"),
        "{}",
        describe_output(&out)
    );
    let (repaired, again) = repair_mount_recheck(&mut fs);
    assert_exit(&repaired, 0);
    assert!(
        stdout(&repaired).contains("moved to lost+found/volumes_42.raw"),
        "{}",
        describe_output(&repaired)
    );
    assert_exit(&again, 0);
    let lost = fs.data.join("lost+found");
    assert_eq!(
        fs::read(lost.join("volumes_42.raw")).unwrap(),
        pattern(5000, 0)
    );
    assert_eq!(
        fs::read(lost.join("chunks_pack-00000009.dat")).unwrap(),
        pattern(5000, 1)
    );
}

#[test]
fn an_emptied_database_is_rebuilt_and_the_volume_recovered_whole() {
    if !require_fuse() {
        return;
    }
    let mut fs = stopped_with_snapshots();
    fs.restart();
    let before = sha256(&fs.volume("db"));
    fs.stop();
    fs::write(fs.data.join("ebsfs.redb"), b"").unwrap();
    let out = check(&fs.data, false);
    assert_exit(&out, 2);
    assert!(
        stdout(&out).contains("corruption: metadata database ebsfs.redb: it is empty"),
        "{}",
        describe_output(&out)
    );
    let repaired = check(&fs.data, true);
    // The snapshots are gone with the database: that stays corruption.
    assert_exit(&repaired, 2);
    let text = stdout(&repaired);
    assert!(text.contains("1 recovered volume (recovered-1)"), "{text}");
    assert!(
        text.contains("the packs were moved to lost+found/"),
        "{text}"
    );
    assert!(
        fs.data
            .join("lost+found")
            .join("chunks_pack-00000001.dat")
            .exists()
    );
    fs.restart();
    assert_eq!(sha256(&fs.volume("recovered-1")), before);
    assert!(
        fs::read_dir(fs.mnt.join("snapshots"))
            .unwrap()
            .next()
            .is_none()
    );
    fs.stop();
    assert_exit(&check(&fs.data, false), 0);
}

#[test]
fn check_refuses_a_mounted_data_directory_and_points_to_scrub() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let out = check(&fs.data, false);
    assert_exit(&out, 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by a running ebsfs") && stderr.contains("ebsfs scrub"),
        "{stderr}"
    );
    // Usage errors are not corruption.
    assert_exit(&try_run(BIN, &["check", "--bogus", "x"]), 1);
}

fn scrub(fs: &Ebsfs) -> Output {
    try_run(
        BIN,
        &[
            OsStr::new("scrub"),
            OsStr::new("--mount"),
            fs.mnt.as_os_str(),
        ],
    )
}

#[test]
fn scrub_reads_every_snapshot_and_names_the_damaged_one() {
    if !require_fuse() {
        return;
    }
    let mut fs = stopped_with_snapshots();
    fs.restart();
    let out = scrub(&fs);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("db@one: OK\ndb@two: OK\n"),
        "{}",
        describe_output(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("2.0 MiB / 2.0 MiB read: db@two"),
        "{}",
        describe_output(&out)
    );
    fs.stop();
    let (_, loc) = chunk_of(&fs.data, "db@two", REWRITTEN);
    flip_byte(&pack_path(&fs.data, loc.pack), loc.offset + 5);
    // A fresh daemon: its block cache cannot hold the chunk.
    fs.restart();
    let out = scrub(&fs);
    assert_exit(&out, 2);
    let expected = format!(
        "db@two: FAILED: reads failed with EIO at bytes {}..{}",
        REWRITTEN * BLOCK,
        (REWRITTEN + 1) * BLOCK
    );
    assert!(
        stdout(&out).contains("db@one: OK"),
        "{}",
        describe_output(&out)
    );
    assert!(
        stdout(&out).contains(&expected),
        "{}",
        describe_output(&out)
    );
    fs.stop();
}

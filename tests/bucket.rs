//! Snapshots in an S3 bucket shared by two hosts, with two real daemons (host A and
//! host B: their own data directories and mounts) and a real S3 server (`s3s-fs`, see
//! `common::s3`): B lists, reads and clones A's snapshots; incremental uploads; A
//! deleting a snapshot while B's copy of it hydrates, and garbage collection; `kill
//! -9` of A mid-upload; the server going away mid-upload; encryption keys; a store
//! that cannot be reached or refuses the credentials; B may not change A's snapshots.
//!
//! Timings are printed, never asserted (machines are noisy).

mod common;
mod snapshot_support;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::s3::{S3Server, StoreConfig};
use common::*;
use snapshot_support::*;

const HOST_A: &str = "hosta";
const HOST_B: &str = "hostb";

/// Target size of a pack object in the bucket (`remote::PACK_OBJECT_BYTES`).
const PACK: u64 = 32 * MIB;

/// How long another host may take to list a new snapshot (it lists every second).
const LISTING_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a collection may take to happen and free what it should.
const COLLECTION_TIMEOUT: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------

/// The S3 server of a test, or `None` (after saying why) when the test cannot run.
fn s3_server() -> Option<S3Server> {
    if !require_fuse() {
        return None;
    }
    S3Server::launch()
}

/// Mounts a daemon using `s3`'s bucket.
fn host(s3: &S3Server, config: StoreConfig) -> Ebsfs {
    Ebsfs::start_with_env(&config.render(), &s3.credentials())
}

/// A daemon using `s3`'s bucket, not started yet (to see it refuse to start).
fn unstarted_host(s3: &S3Server, config: StoreConfig) -> Ebsfs {
    let mut fs = Ebsfs::unstarted(&config.render());
    for (key, value) in s3.credentials() {
        fs.set_env(key, Some(value));
    }
    fs
}

/// How every other host shows host A's snapshot `id`.
fn of_a(id: &str) -> String {
    format!("{id}@{HOST_A}")
}

fn wait_listed(fs: &Ebsfs, id: &str) {
    let start = Instant::now();
    wait_until(
        &format!("snapshot {id} to be listed"),
        LISTING_TIMEOUT,
        || listed_snapshots(fs).iter().any(|n| n == id),
    );
    eprintln!("{id} listed after {:.1} s", start.elapsed().as_secs_f64());
}

fn wait_unlisted(fs: &Ebsfs, id: &str) {
    wait_until(&format!("snapshot {id} to go"), LISTING_TIMEOUT, || {
        !listed_snapshots(fs).iter().any(|n| n == id)
    });
}

/// A string of a snapshot's `info`, panicking with the whole `info` if it is missing.
fn info_text(fs: &Ebsfs, id: &str, key: &str) -> String {
    info_str(fs, id, key).unwrap_or_else(|| panic!("info of {id} has no {key}: {:?}", fs.info(id)))
}

/// The collections a daemon logged (one line each).
fn collections(fs: &Ebsfs) -> Vec<String> {
    fs.log()
        .lines()
        .filter(|l| l.contains(": garbage collection: "))
        .map(str::to_string)
        .collect()
}

/// Restarts a daemon, which collects the bucket's garbage when it starts (once it has
/// nothing left to upload); returns the collection's log line.
fn restart_and_collect(fs: &mut Ebsfs) -> String {
    let before = collections(fs).len();
    fs.stop();
    fs.restart();
    wait_until("the collection at start-up", COLLECTION_TIMEOUT, || {
        collections(fs).len() > before
    });
    collections(fs).pop().expect("a collection")
}

/// Restarts `fs` (a collection each time) until `done` holds, for leases of other
/// hosts that still name what should go to be renewed; panics after
/// [`COLLECTION_TIMEOUT`] with the last collection's line.
fn collect_until(fs: &mut Ebsfs, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        let report = restart_and_collect(fs);
        eprintln!("{report}");
        if done() {
            return;
        }
        assert!(
            start.elapsed() < COLLECTION_TIMEOUT,
            "no collection {what} within {COLLECTION_TIMEOUT:?}; the last: {report}"
        );
        // Other hosts renew their leases every eighth of it.
        std::thread::sleep(Duration::from_secs(common::s3::LEASE_SECONDS / 8));
    }
}

/// Waits until `id` on `fs` is pending with its upload under way and at least
/// `packs` pack objects in the bucket; returns them. Panics if the snapshot completes
/// first (the test's precondition: give it more data).
fn wait_for_uploaded_packs(
    fs: &Ebsfs,
    s3: &S3Server,
    id: &str,
    packs: usize,
) -> Vec<(String, u64)> {
    let start = Instant::now();
    loop {
        let found = s3.objects("packs");
        let status = fs.status(id);
        assert_eq!(
            status,
            "pending",
            "precondition: snapshot {id} ended before {packs} packs were in the bucket \
             ({} were): the upload was too fast for this test",
            found.len()
        );
        if found.len() >= packs {
            eprintln!(
                "{} packs ({} MiB) in the bucket after {:.1} s, progress {}%",
                found.len(),
                found.iter().map(|p| p.1).sum::<u64>() / MIB,
                start.elapsed().as_secs_f64(),
                fs.progress(id)
            );
            return found;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "snapshot {id}: no {packs} packs in the bucket after 600 s:\n{}",
            tail_lines(&fs.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Host A with `block_size` blocks sending one pack at a time (each is recorded in
/// the data directory as soon as its PUT returns, so at most one is in the bucket
/// and not recorded when a kill comes), a volume `db` of `data` random bytes, and
/// snapshot `db@one` of it just started; returns A and the volume's sha256.
fn one_pack_at_a_time(s3: &S3Server, block_size: &str, data: u64) -> (Ebsfs, String) {
    let a = host(
        s3,
        s3.config(HOST_A)
            .top(&format!("block_size = \"{block_size}\""))
            .store("upload_concurrency = 1"),
    );
    random_volume(&a, "db", data / MIB, 0, data / MIB);
    let sum = sha256(&a.volume("db"));
    mkdir_snapshot(&a, "db@one").unwrap();
    (a, sum)
}

/// Checks that the packs `seen` in the bucket over a test (and those there now) add
/// up to `data` plus at most the one pack in flight at a kill.
fn assert_sent_once(s3: &S3Server, mut seen: BTreeMap<String, u64>, data: u64) {
    seen.extend(s3.objects("packs"));
    let ever: u64 = seen.values().sum();
    eprintln!(
        "{} packs, {} MiB, were ever in the bucket for {} MiB of data",
        seen.len(),
        ever / MIB,
        data / MIB
    );
    assert!(
        (data..=data + PACK).contains(&ever),
        "{ever} bytes of packs were uploaded for {data} bytes of data: the resumed upload \
         sent again what was there"
    );
}

// ---------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------

/// A snapshot of ext4 taken on A completes once in the bucket; B lists it under A's
/// name with A as its host, reads the same bytes, and copies it by reference (the
/// data directory barely grows); the copy mounts with A's files, takes B's writes,
/// and A's snapshot stays as it was on both hosts.
#[test]
fn a_snapshot_taken_on_one_host_is_read_and_cloned_on_another() {
    let Some(s3) = s3_server() else {
        return;
    };
    let mut a = host(&s3, s3.config(HOST_A));
    let mut b = host(&s3, s3.config(HOST_B).top("hydrate = false"));

    let files = ext4_volume_with_tree(&mut a, "db", "256M");
    let volume_sum = sha256(&a.volume("db"));
    take_snapshot(&a, "db@one");
    assert_eq!(info_text(&a, "db@one", "host"), HOST_A);
    assert_eq!(info_text(&a, "db@one", "location"), "local+bucket");
    assert_eq!(info_str(&a, "db@one", "upload_error"), None);

    let id = of_a("db@one");
    wait_listed(&b, &id);
    assert_eq!(b.status(&id), "completed");
    assert_eq!(info_text(&b, &id, "host"), HOST_A);
    assert_eq!(info_text(&b, &id, "location"), "bucket");
    assert_eq!(info_text(&b, &id, "volume"), "db");
    assert_eq!(b.info_u64(&id, "size"), 256 * MIB);
    assert_eq!(
        sha256(&image(&b, &id)),
        volume_sum,
        "B's image of A's snapshot"
    );

    let before = du_bytes(&b.data);
    cp_image(&b, &id, "copy");
    let growth = du_bytes(&b.data).saturating_sub(before);
    eprintln!("B's data directory grew by {growth} bytes with the copy");
    assert!(
        growth < MIB,
        "a copy by reference grew B's data directory by {growth} bytes"
    );
    let copy = b.volume("copy");
    assert_eq!(
        get_xattr(&copy, "user.ebsfs.source").unwrap(),
        id.as_bytes()
    );
    assert_eq!(hydrated_percent(&copy), 0, "hydrated with hydrate = false");
    assert_eq!(sha256(&copy), volume_sum, "the copy");

    let dir = b.loop_mount(&copy, "copy", "");
    let found = tree_sums(&dir);
    assert_eq!(
        found,
        files,
        "files on the copy: {}",
        tree_diff(&files, &found)
    );
    fs::write(dir.join("written-on-b"), pattern(3 * MIB as usize, 77)).unwrap();
    fs::remove_file(dir.join("d0/f1")).unwrap();
    b.loop_unmount(&dir);
    assert_ne!(sha256(&copy), volume_sum, "B's writes reached its copy");

    assert_eq!(
        sha256(&image(&a, "db@one")),
        volume_sum,
        "A's snapshot on A"
    );
    assert_eq!(sha256(&image(&b, &id)), volume_sum, "A's snapshot on B");
    let snap = b.loop_mount(&image(&b, &id), "snap", "ro,noload");
    let found = tree_sums(&snap);
    assert_eq!(
        found,
        files,
        "files of A's snapshot on B: {}",
        tree_diff(&files, &found)
    );
}

/// A's second snapshot of a volume uploads only the blocks changed since the first
/// (the bucket's packs grow by about the changed bytes); B reads both; once A deleted
/// the first and a collection removed its root, B (restarted: nothing cached) still
/// reads the second right.
#[test]
fn an_incremental_snapshot_uploads_only_its_changes_and_outlives_the_first() {
    let Some(s3) = s3_server() else {
        return;
    };
    let mut a = host(&s3, s3.config(HOST_A));
    let mut b = host(&s3, s3.config(HOST_B));
    let data = 64 * MIB;
    random_volume(&a, "db", 128, 0, data / MIB);
    let first_sum = sha256(&a.volume("db"));
    take_snapshot(&a, "db@one");
    let packs_one = s3.bytes("packs");
    eprintln!("first upload: {packs_one} bytes of packs for {data} bytes of random data");
    assert!(
        (data..=data + data / 64).contains(&packs_one),
        "{packs_one} bytes of packs for {data} bytes of data"
    );

    let changed = MIB;
    write_urandom(&a.volume("db"), 10, changed / MIB);
    let second_sum = sha256(&a.volume("db"));
    take_snapshot(&a, "db@two");
    let growth = s3.bytes("packs") - packs_one;
    eprintln!("second upload: packs grew by {growth} bytes for {changed} bytes changed");
    assert!(
        (changed..=changed + changed / 8).contains(&growth),
        "an upload of {changed} changed bytes grew the packs by {growth} bytes"
    );
    assert_eq!(a.info_u64("db@two", "changed_blocks"), changed / (64 * KIB));
    assert_eq!(s3.objects("snapshots").len(), 2, "one root per snapshot");

    wait_listed(&b, &of_a("db@two"));
    assert_eq!(sha256(&image(&b, &of_a("db@two"))), second_sum);
    assert_eq!(sha256(&image(&b, &of_a("db@one"))), first_sum);

    fs::remove_dir(a.snapshot("db@one")).unwrap();
    wait_unlisted(&b, &of_a("db@one"));
    collect_until(&mut a, "removed the first snapshot's root", || {
        s3.objects("snapshots").len() == 1
    });
    assert!(listed_snapshots(&a).contains(&"db@two".to_string()));
    b.stop();
    b.restart();
    wait_listed(&b, &of_a("db@two"));
    assert!(!listed_snapshots(&b).contains(&of_a("db@one")));
    assert_eq!(sha256(&image(&b, &of_a("db@two"))), second_sum, "on B");
    assert_eq!(sha256(&image(&a, "db@two")), second_sum, "on A");
}

/// B copies A's snapshot; A deletes the snapshot and its volume, and a collection
/// runs with nothing but B's lease protecting the snapshot: it keeps every object.
/// B's image opened before keeps reading the right bytes to the end, the copy reads
/// right and, once B hydrates it, reaches 100% and still reads right. Once B deletes
/// the copy, a collection frees the bucket.
#[test]
fn a_copy_outlives_its_snapshot_deleted_on_its_host_and_a_collection() {
    let Some(s3) = s3_server() else {
        return;
    };
    let mut a = host(&s3, s3.config(HOST_A));
    // No hydration until A's collection ran, so that all of it comes after.
    let mut b = host(&s3, s3.config(HOST_B).top("hydrate = false"));
    let data_mib = 128;
    random_volume(&a, "db", 256, 64, data_mib);
    let sum = sha256(&a.volume("db"));
    let middle = read_range(&a.volume("db"), 100 * MIB, MIB as usize);
    take_snapshot(&a, "db@one");
    let id = of_a("db@one");
    wait_listed(&b, &id);
    cp_image(&b, &id, "copy");
    let copy = b.volume("copy");
    assert_eq!(hydrated_percent(&copy), 0);
    assert_eq!(read_range(&copy, 100 * MIB, MIB as usize), middle);
    let mut opened = fs::File::open(image(&b, &id)).unwrap();

    fs::remove_dir(a.snapshot("db@one")).unwrap();
    fs::remove_file(a.volume("db")).unwrap();
    wait_unlisted(&b, &id);
    let packs = s3.objects("packs");
    let roots = s3.objects("snapshots");
    // A restarted forgets the roots it completed lately: only B's lease keeps them.
    let report = restart_and_collect(&mut a);
    eprintln!("{report}");
    assert!(
        report.contains("kept: roots 1"),
        "the collection should keep the deleted snapshot B reads: {report}"
    );
    assert_eq!(s3.objects("packs"), packs, "packs after A's collection");
    assert_eq!(s3.objects("snapshots"), roots, "roots after A's collection");

    let mut bytes = Vec::new();
    opened.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes.len() as u64, 256 * MIB);
    assert_eq!(
        sha256_bytes(&bytes),
        sum,
        "B's image opened before the deletion"
    );
    drop((opened, bytes));
    assert_eq!(sha256(&copy), sum, "the copy, read from the bucket");

    b.stop();
    b.write_config(&s3.config(HOST_B).render());
    b.restart();
    wait_hydrated(&b, "copy");
    assert_eq!(sha256(&copy), sum, "the copy, hydrated");

    fs::remove_file(&copy).unwrap();
    collect_until(&mut a, "freed the deleted snapshot", || {
        s3.objects("packs").is_empty() && s3.objects("snapshots").is_empty()
    });
    assert_eq!(s3.bytes("pages"), 0, "pages left in the bucket");

    // `ebsfs bucket gc` collects as a host of its own, and leaves no lease behind.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ebsfs"))
        .args(["bucket", "gc", "--config", a.config.to_str().unwrap()])
        .envs(s3.credentials())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("as host {HOST_A}.gc")),
        "{}",
        describe_output(&out)
    );
    let leases = s3.objects("hosts");
    assert!(
        !leases.is_empty() && !leases.iter().any(|(name, _)| name.ends_with(".gc")),
        "{leases:?}"
    );
}

/// `kill -9` of A while it uploads a snapshot: restarted, A resumes the upload and
/// completes it, sending again at most the one pack that was in flight (every pack
/// ever seen in the bucket adds up to the data plus one pack), B reads the right
/// bytes, and once A collected, the bucket holds the data once.
#[test]
fn an_upload_cut_by_kill_9_resumes_and_sends_nothing_twice() {
    let Some(s3) = s3_server() else {
        return;
    };
    // 32 KiB blocks, so that a page of the block map holds one pack's worth.
    let data = 512 * MIB;
    let (mut a, sum) = one_pack_at_a_time(&s3, "32KiB", data);
    // Packs may go ahead while the capture runs: the kill comes after the capture
    // ended and two more packs went up, in the upload proper.
    // With a store, the capture is the first half of `progress`.
    wait_for_progress(&a, "db@one", 50);
    let ahead = s3.objects("packs").len();
    let seen: BTreeMap<String, u64> = wait_for_uploaded_packs(&a, &s3, "db@one", ahead + 2)
        .into_iter()
        .collect();
    a.kill9();
    let collected_before = collections(&a).len();
    a.restart();
    let status = a.wait_snapshot("db@one");
    assert_eq!(status, "completed", "{}", tail_lines(&a.log(), 30));
    assert!(
        a.log().contains("snapshot db@one: resuming its upload"),
        "precondition: the upload was cut short:\n{}",
        tail_lines(&a.log(), 30)
    );
    assert_sent_once(&s3, seen, data);
    // A collects after its uploads: a pack sent twice goes.
    wait_until("A's collection", COLLECTION_TIMEOUT, || {
        collections(&a).len() > collected_before
    });
    let stored = s3.bytes("packs");
    assert!(
        (data..=data + PACK).contains(&stored),
        "{stored} bytes of packs for {data} bytes of data"
    );

    let b = host(&s3, s3.config(HOST_B));
    wait_listed(&b, &of_a("db@one"));
    assert_eq!(sha256(&image(&b, &of_a("db@one"))), sum);
}

/// Packs go up while the capture still runs (each batch of 16,384 blocks it commits
/// hands its chunks to the bucket thread); a `kill -9` then leaves a capture to
/// resume and packs recorded under its snapshot: after the restart the capture
/// resumes, the upload reuses what went ahead instead of sending it again, and B
/// reads the snapshot's bytes.
#[test]
fn chunks_sent_while_capturing_survive_kill_9_and_are_not_sent_twice() {
    let Some(s3) = s3_server() else {
        return;
    };
    // 4 KiB blocks: a batch is 64 MiB, so the capture of 768 MiB commits eleven
    // before its end.
    let data = 768 * MIB;
    let (mut a, sum) = one_pack_at_a_time(&s3, "4KiB", data);
    let start = Instant::now();
    let seen: BTreeMap<String, u64> = loop {
        let found = s3.objects("packs");
        // With a store, the capture is the first half of `progress`.
        let capturing = a.progress("db@one") < 50;
        assert!(
            capturing || !found.is_empty(),
            "precondition: the capture ended before any pack went up:\n{}",
            tail_lines(&a.log(), 20)
        );
        if !found.is_empty() {
            assert!(
                capturing,
                "precondition: a pack went up only after the capture ended"
            );
            eprintln!(
                "{} packs in the bucket after {:.1} s, capture at {}%",
                found.len(),
                start.elapsed().as_secs_f64(),
                a.progress("db@one") * 2
            );
            break found.into_iter().collect();
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "no pack after 600 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    a.kill9();
    a.restart();
    let status = a.wait_snapshot("db@one");
    assert_eq!(status, "completed", "{}", tail_lines(&a.log(), 30));
    assert!(
        a.log().contains("snapshot db@one resumes its capture"),
        "the capture was cut short:\n{}",
        tail_lines(&a.log(), 30)
    );
    // The line comes just after the status changes.
    wait_until("the upload's log line", Duration::from_secs(30), || {
        a.log().contains("snapshot db@one completed in the bucket")
    });
    assert!(
        a.log().contains("chunks sent by an earlier attempt"),
        "the upload reused nothing sent while capturing:\n{}",
        tail_lines(&a.log(), 30)
    );
    assert_sent_once(&s3, seen, data);
    let b = host(&s3, s3.config(HOST_B));
    wait_listed(&b, &of_a("db@one"));
    assert_eq!(sha256(&image(&b, &of_a("db@one"))), sum);
}

/// Between A and the server, one byte of the first pack's body is flipped on the
/// wire: the server refuses the write (its checksum does not match), the upload
/// retries, and the snapshot B reads has A's bytes. Nothing damaged lands.
#[test]
fn a_pack_damaged_on_the_wire_is_refused_and_sent_again() {
    let Some(s3) = s3_server() else {
        return;
    };
    let proxy = FlippingProxy::start(&s3.endpoint());
    let a = host(&s3, s3.config(HOST_A).endpoint(&proxy.endpoint));
    let data = 64 * MIB;
    random_volume(&a, "db", data / MIB, 0, data / MIB);
    let sum = sha256(&a.volume("db"));
    mkdir_snapshot(&a, "db@one").unwrap();
    let status = a.wait_snapshot("db@one");
    assert_eq!(status, "completed", "{}", tail_lines(&a.log(), 30));
    assert!(
        proxy.flipped(),
        "precondition: no pack went through the proxy"
    );
    assert!(
        a.log().contains("upload failed, will retry"),
        "the damaged pack was not refused:\n{}",
        tail_lines(&a.log(), 30)
    );
    let b = host(&s3, s3.config(HOST_B));
    wait_listed(&b, &of_a("db@one"));
    assert_eq!(sha256(&image(&b, &of_a("db@one"))), sum);
}

/// A TCP proxy in front of an S3 server that flips one byte in the body of the first
/// `PUT` of a pack it forwards, and forwards everything else unchanged.
struct FlippingProxy {
    endpoint: String,
    flipped: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FlippingProxy {
    fn start(server: &str) -> FlippingProxy {
        use std::net::{TcpListener, TcpStream};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let target = server
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let flipped = Arc::new(AtomicBool::new(false));
        let done = flipped.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (mut from_server, mut to_client) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                    let _ = to_client.shutdown(std::net::Shutdown::Both);
                });
                let done = done.clone();
                std::thread::spawn(move || {
                    let (mut client, mut server) = (client, server);
                    let mut seen: Vec<u8> = Vec::new();
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = match client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let chunk = &mut buf[..n];
                        if !done.load(Ordering::Acquire) {
                            // Look for a pack's PUT and the end of its headers; flip
                            // the 4,096th byte of the body.
                            let from = seen.len();
                            seen.extend_from_slice(chunk);
                            if let Some(put) = pack_put(&seen)
                                && let Some(end) = find(&seen[put..], b"\r\n\r\n")
                            {
                                let target = put + end + 4 + 4096;
                                if target >= from && target < seen.len() {
                                    chunk[target - from] ^= 0x01;
                                    done.store(true, Ordering::Release);
                                }
                            }
                            if seen.len() > 1 << 20 && !done.load(Ordering::Acquire) {
                                // Keep only the tail: a request line may straddle.
                                seen.drain(..seen.len() - 4096);
                            }
                        }
                        if server.write_all(chunk).is_err() {
                            break;
                        }
                    }
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        FlippingProxy { endpoint, flipped }
    }

    fn flipped(&self) -> bool {
        self.flipped.load(std::sync::atomic::Ordering::Acquire)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Where the request line of the first `PUT` of a pack in `stream` starts.
fn pack_put(stream: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(found) = find(&stream[at..], b"PUT /") {
        let line = at + found;
        let line_end = find(&stream[line..], b"\r\n").map_or(stream.len(), |e| line + e);
        if find(&stream[line..line_end], b"/packs/").is_some() {
            return Some(line);
        }
        at = line + 1;
    }
    None
}

/// The S3 server goes away while A uploads: the snapshot stays pending with an
/// `upload_error`, the volume stays writable and readable (direct I/O); once the
/// server is back the snapshot completes, and B reads it as it was at `mkdir`.
#[test]
fn a_snapshot_waits_for_a_server_that_went_away_while_its_volume_works() {
    let Some(mut s3) = s3_server() else {
        return;
    };
    let a = host(&s3, s3.config(HOST_A));
    let data = 512 * MIB;
    random_volume(&a, "db", data / MIB, 0, data / MIB);
    let sum = sha256(&a.volume("db"));
    mkdir_snapshot(&a, "db@one").unwrap();
    wait_for_uploaded_packs(&a, &s3, "db@one", 1);
    s3.stop();

    wait_until("an upload_error in info", Duration::from_secs(300), || {
        info_str(&a, "db@one", "upload_error").is_some()
    });
    eprintln!("upload_error: {}", info_text(&a, "db@one", "upload_error"));
    assert!(
        a.log().contains("backing off"),
        "the client's retries are not in the daemon's log:\n{}",
        tail_lines(&a.log(), 30)
    );
    assert_eq!(a.status("db@one"), "pending");
    let written = a.scratch_pattern(4 * MIB as usize, 5);
    let volume = path_str(&a.volume("db"));
    run(
        "dd",
        &[
            format!("if={}", written.display()),
            format!("of={volume}"),
            "bs=1M".into(),
            "seek=100".into(),
            "oflag=direct".into(),
            "conv=notrunc,fsync".into(),
            "status=none".into(),
        ],
    );
    let read_back = a.scratch("read-back");
    run(
        "dd",
        &[
            format!("if={volume}"),
            format!("of={}", read_back.display()),
            "bs=1M".into(),
            "skip=100".into(),
            "count=4".into(),
            "iflag=direct".into(),
            "status=none".into(),
        ],
    );
    assert_eq!(
        fs::read(&read_back).unwrap(),
        fs::read(&written).unwrap(),
        "read back with direct I/O while the server is down"
    );
    assert_eq!(a.status("db@one"), "pending");

    s3.start();
    let status = a.wait_snapshot("db@one");
    assert_eq!(status, "completed", "{}", tail_lines(&a.log(), 30));
    assert_eq!(info_str(&a, "db@one", "upload_error"), None);
    assert_eq!(info_text(&a, "db@one", "location"), "local+bucket");
    let b = host(&s3, s3.config(HOST_B));
    wait_listed(&b, &of_a("db@one"));
    assert_eq!(
        sha256(&image(&b, &of_a("db@one"))),
        sum,
        "the snapshot as at mkdir, not the write after it"
    );
}

/// A 32-byte key, as 64 hex digits, in a file of its own.
fn key_file(fs: &Ebsfs, name: &str, seed: u64) -> String {
    let hex: String = pattern(32, seed)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = fs.write_scratch(name, hex.as_bytes());
    format!("key_file = \"{}\"", path.display())
}

/// With a `key_file`, A makes the bucket encrypted: no object's name holds the
/// volume's, the label's or the host's name, and no pack holds the plain bytes. B
/// with another key, or none, is refused at mount with a message naming the key;
/// with the same key it reads A's snapshot.
#[test]
fn an_encrypted_store_opens_only_with_its_key_and_hides_names() {
    let Some(s3) = s3_server() else {
        return;
    };
    const HOST: &str = "hostalpha";
    let mut a = Ebsfs::unstarted("");
    let key = key_file(&a, "key", 1);
    a.write_config(&s3.config(HOST).store(&key).render());
    for (k, v) in s3.credentials() {
        a.set_env(k, Some(v));
    }
    a.restart();
    let marker = b"plain text that must not reach the bucket;".repeat(1 << 14);
    let volume = a.volume("payroll");
    run("truncate", &["-s16M", &path_str(&volume)]);
    fs::OpenOptions::new()
        .write(true)
        .open(&volume)
        .unwrap()
        .write_all_at(&marker, MIB)
        .unwrap();
    write_urandom(&volume, 8, 4);
    let sum = sha256(&volume);
    take_snapshot(&a, "payroll@quarterly");

    let names = s3.all_objects();
    eprintln!("objects in the bucket: {names:?}");
    for kind in ["packs/", "pages/", "snapshots/", "hosts/"] {
        assert!(
            names.iter().any(|n| n.starts_with(kind)),
            "no {kind} object in {names:?}"
        );
    }
    for secret in ["payroll", "quarterly", HOST] {
        assert!(
            !names.iter().any(|n| n.contains(secret)),
            "an object name holds {secret:?}: {names:?}"
        );
    }
    let needle = &marker[..42];
    for (name, _) in s3.objects("packs") {
        let bytes = fs::read(s3.store_dir().join(&name)).unwrap();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "pack {name} holds the volume's plain bytes"
        );
    }

    let mut wrong = unstarted_host(&s3, s3.config(HOST_B));
    let other_key = key_file(&wrong, "other-key", 2);
    wrong.write_config(&s3.config(HOST_B).store(&other_key).render());
    let start = Instant::now();
    let refusal = wrong
        .try_restart()
        .expect_err("a mount with the wrong key must fail");
    eprintln!(
        "wrong key refused in {:.1} s: {}",
        start.elapsed().as_secs_f64(),
        refusal.stderr.trim()
    );
    assert!(
        refusal.stderr.contains("the key does not open this store"),
        "{refusal:?}"
    );

    let mut keyless = unstarted_host(&s3, s3.config(HOST_B));
    let refusal = keyless
        .try_restart()
        .expect_err("a mount without the key must fail");
    eprintln!("no key refused: {}", refusal.stderr.trim());
    assert!(
        refusal.stderr.contains("encrypted") && refusal.stderr.contains("key_file"),
        "{refusal:?}"
    );

    let mut b = unstarted_host(&s3, s3.config(HOST_B));
    let same_key = key_file(&b, "key", 1);
    b.write_config(&s3.config(HOST_B).store(&same_key).render());
    b.restart();
    let id = format!("payroll@quarterly@{HOST}");
    wait_listed(&b, &id);
    assert_eq!(sha256(&image(&b, &id)), sum);
}

/// A mount whose store cannot be reached (nothing listens at the endpoint), refuses
/// the credentials, or has none, fails by itself (no hang) with a message saying so.
#[test]
fn a_mount_fails_with_a_clear_message_when_the_store_cannot_be_used() {
    let Some(s3) = s3_server() else {
        return;
    };
    let nowhere = format!("http://127.0.0.1:{}", common::s3::free_port());
    let bad_secret = || {
        let mut fs = unstarted_host(&s3, s3.config(HOST_A));
        fs.set_env("AWS_SECRET_ACCESS_KEY", Some("not-the-secret"));
        fs
    };
    let no_credentials = || {
        let mut fs = Ebsfs::unstarted(&s3.config(HOST_A).render());
        fs.set_env("AWS_ACCESS_KEY_ID", None);
        fs.set_env("AWS_SECRET_ACCESS_KEY", None);
        fs
    };
    let cases: [(&str, Ebsfs, &[&str]); 3] = [
        (
            "no server at the endpoint",
            unstarted_host(&s3, s3.config(HOST_A).endpoint(&nowhere)),
            &["cannot be reached", &nowhere],
        ),
        (
            "a wrong secret key",
            bad_secret(),
            &["refused access", "credentials"],
        ),
        (
            "no credentials",
            no_credentials(),
            &["no S3 credentials", "AWS_ACCESS_KEY_ID"],
        ),
    ];
    for (case, mut fs, expected) in cases {
        let start = Instant::now();
        let refusal = fs
            .try_restart()
            .expect_err(&format!("{case}: the mount must fail"));
        eprintln!(
            "{case}: refused in {:.1} s, {}: {}",
            start.elapsed().as_secs_f64(),
            refusal.status,
            refusal.stderr.trim()
        );
        assert!(
            !refusal.status.success(),
            "{case}: exit status {}",
            refusal.status
        );
        for text in expected {
            assert!(
                refusal.stderr.contains(text),
                "{case}: the message does not say {text:?}: {refusal:?}"
            );
        }
    }
    // The same store, reachable and with the right credentials, mounts.
    let a = host(&s3, s3.config(HOST_A));
    assert!(a.mnt.join("snapshots").is_dir());
}

/// Only its host changes or deletes a snapshot: on B, `rmdir`, `chmod`, `setfacl`
/// and `setfattr` of A's snapshot fail with `EPERM`, and it stays.
#[test]
fn another_hosts_snapshot_cannot_be_deleted_or_shared() {
    let Some(s3) = s3_server() else {
        return;
    };
    let a = host(&s3, s3.config(HOST_A));
    let b = host(&s3, s3.config(HOST_B));
    random_volume(&a, "db", 8, 0, 4);
    take_snapshot(&a, "db@one");
    let id = of_a("db@one");
    wait_listed(&b, &id);
    let dir = b.snapshot(&id);

    assert_errno("rmdir on B", fs::remove_dir(&dir), libc::EPERM);
    assert_errno("chmod on B", chmod_path(&dir, 0o755), libc::EPERM);
    assert_errno(
        "setxattr on B",
        set_xattr(&dir, "user.note", b"mine"),
        libc::EPERM,
    );
    let out = try_run(
        "setfacl",
        &[OsStr::new("-m"), OsStr::new("u:nobody:rx"), dir.as_os_str()],
    );
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not permitted"),
        "setfacl on B: {}",
        describe_output(&out)
    );

    assert!(listed_snapshots(&b).contains(&id));
    assert_eq!(b.status(&id), "completed");
    assert_eq!(a.status("db@one"), "completed");
    assert_eq!(sha256(&image(&b, &id)), sha256(&a.volume("db")));
}

//! Stress: `kill -9` of the daemon at random moments while direct-I/O writers collide
//! on a few blocks of a volume and snapshots are taken back to back.
//!
//! Each cycle starts writers on the first 256 KiB of volume `v` — fio (libaio,
//! `direct=1`, two jobs, one with `fdatasync`) on a loop device attached with
//! `--direct-io=on`, and/or threads of this test doing `O_DIRECT` `pwrite`s of 4 KiB
//! pages and 64 KiB blocks, some followed by `fdatasync` — while a loop runs
//! `mkdir snapshots/v@cN-K` back to back (`EBUSY` while one is pending: retry). Then the
//! daemon is killed with SIGKILL — after a random delay, a random few microseconds into
//! a `mkdir` (the freeze), or just after one returned (capture and copy-on-write
//! running, writers marking the fresh dirty map) — the writers are stopped, the loop
//! device is detached, and the daemon restarts on the same data directory. After every
//! restart:
//! - the data directory mounts;
//! - every snapshot whose `mkdir` returned is still listed, and none whose `rmdir`
//!   returned is; each listed snapshot ends `completed` (a capture the kill
//!   interrupted resumes; none ends `error` or stays `pending`);
//! - every `completed` image has the volume's size, the initial contents outside the
//!   written region, and the same content hash at every later restart;
//! - outside the written region the live volume still holds its initial contents;
//! - with no writer running, a fresh snapshot `v@check-N` equals the live volume byte
//!   for byte (a failure names the first differing offset).
//!
//! Old snapshots are deleted as cycles go, keeping `v@base`, the newest check and the
//! two newest others, so every cycle costs the same. A watchdog kills the daemon if a
//! check overruns, so a hung daemon fails the test instead of hanging it.
//!
//! Every run prints its seed; `EBSFS_STRESS_SEED=<seed>` replays the same schedule
//! (writer mix, write offsets, kill moments; the interleaving itself depends on timing,
//! so a failure may need several tries: `EBSFS_STRESS_ONLY_CYCLE=<n>` runs the schedule
//! of cycle `n` in every cycle). `EBSFS_STRESS_CYCLES` sets the number of cycles
//! (default 20, about 20 s on two cores). A soak (about 1 s per cycle), with the
//! per-test time limit raised by the `soak` nextest profile:
//!
//! ```text
//! EBSFS_STRESS_CYCLES=500 cargo nextest run --profile soak --test stress_kill9 --no-capture
//! ```

mod common;
mod snapshot_support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use snapshot_support::*;

const VOLUME: &str = "v";
const VOLUME_BYTES: u64 = 16 * MIB;
/// Every write lands here, so that writers collide.
const HOT_BYTES: u64 = 256 * KIB;
const PAGE: u64 = 4 * KIB;
const DEFAULT_CYCLES: u64 = 20;
/// How long an interrupted snapshot may stay `pending` after a restart.
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the checks after a restart may take before the watchdog kills the daemon.
const CHECK_TIMEOUT: Duration = Duration::from_secs(300);
/// Run snapshots kept between cycles besides `v@base` and the newest check.
const KEEP_RUN_SNAPSHOTS: usize = 2;

// ---------------------------------------------------------------------------------
// The schedule: everything random comes from the seed.
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Writers {
    Fio,
    Threads,
    Both,
}

#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// SIGKILL this long after the writers and the snapshot loop started.
    After(Duration),
    /// After `warmup`, SIGKILL `delay` after the snapshot loop enters a `mkdir` that
    /// freezes (the previous capture has finished).
    InMkdir { warmup: Duration, delay: Duration },
    /// After `warmup`, SIGKILL `delay` after such a `mkdir` returned: while its capture
    /// (and copy-on-write of the blocks it still needs) runs and the writers mark
    /// blocks in the fresh dirty map.
    AfterFreeze { warmup: Duration, delay: Duration },
}

#[derive(Clone, Copy, Debug)]
struct Plan {
    writers: Writers,
    threads: usize,
    kill: KillAt,
    seed: u64,
}

impl Plan {
    fn random(rng: &mut Rng) -> Plan {
        let writers = match rng.below(4) {
            0 => Writers::Fio,
            1 => Writers::Threads,
            _ => Writers::Both,
        };
        let warmup = Duration::from_millis(50 + rng.below(600));
        let kill = match rng.below(10) {
            0..=2 => {
                // Half of them within the first millisecond, around the freeze (seen
                // 0.4-0.6 ms into a mkdir under strace); the others up to 10 ms, while
                // the pending record is committed (a mkdir takes 1-10 ms here).
                let max_delay = if rng.below(2) == 0 { 1000 } else { 10_000 };
                KillAt::InMkdir {
                    warmup,
                    delay: Duration::from_micros(rng.below(max_delay)),
                }
            }
            3..=5 => KillAt::AfterFreeze {
                warmup,
                delay: Duration::from_micros(rng.below(1000)),
            },
            _ => KillAt::After(Duration::from_millis(30 + rng.below(1200))),
        };
        Plan {
            writers,
            threads: 2 + rng.below(2) as usize,
            kill,
            seed: rng.next(),
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={value:?} is not a number: {e}")),
    )
}

// ---------------------------------------------------------------------------------
// The workload: writers and the snapshot loop, stopped on every path.
// ---------------------------------------------------------------------------------

#[derive(Default)]
struct Flags {
    /// The daemon is being killed: errors from now on are expected.
    dying: AtomicBool,
    /// Exit at the next iteration.
    stop: AtomicBool,
    /// The snapshot loop should raise `entering` at its next freezing `mkdir`.
    armed: AtomicBool,
    /// Raised right before that `mkdir`; the killer spins on it.
    entering: AtomicBool,
    /// Raised when that `mkdir` returned 0.
    frozen: AtomicBool,
}

#[derive(Debug, Default)]
struct WriterReport {
    writes: u64,
    syncs: u64,
    /// An error while the daemon was running.
    unexpected: Option<String>,
}

#[derive(Debug, Default)]
struct SnapLog {
    /// `mkdir` returned 0.
    created: Vec<String>,
    /// `mkdir` issued when the daemon died: it may or may not exist after the restart.
    in_flight: Option<String>,
    /// Read `completed` from `status` before the kill.
    seen_completed: Vec<String>,
    /// Read `error` from `status` before the kill (reported, not a failure).
    seen_error: Vec<String>,
    busy: u64,
    /// How long each successful `mkdir` took.
    mkdir_micros: Vec<u64>,
    /// An error while the daemon was running.
    unexpected: Option<String>,
}

struct Workload {
    flags: Arc<Flags>,
    fio: Option<Child>,
    fio_output: PathBuf,
    loop_device: Option<LoopDevice>,
    /// The loop device's write count when attached (devices are reused).
    loop_writes_before: u64,
    writers: Vec<JoinHandle<WriterReport>>,
    snapshots: Option<JoinHandle<SnapLog>>,
}

impl Workload {
    fn start(fs: &Ebsfs, plan: &Plan, cycle: u64) -> Workload {
        let flags = Arc::new(Flags::default());
        let volume = fs.volume(VOLUME);
        let mut work = Workload {
            flags: flags.clone(),
            fio: None,
            fio_output: fs.scratch(&format!("fio-{cycle}.out")),
            loop_device: None,
            loop_writes_before: 0,
            writers: Vec::new(),
            snapshots: None,
        };
        if plan.writers != Writers::Threads {
            let device = LoopDevice::attach(&volume, true);
            work.loop_writes_before = loop_writes(&device.dev);
            work.fio = Some(spawn_fio(&device.dev, &work.fio_output, plan.seed));
            work.loop_device = Some(device);
            // fio takes a while to start: the cycle begins once it writes.
            wait_until("fio to start writing", Duration::from_secs(30), || {
                work.fio_writes() > 0 || work.fio_exited().is_some()
            });
        }
        if plan.writers != Writers::Fio {
            for t in 0..plan.threads {
                let (path, flags) = (volume.clone(), flags.clone());
                let seed = plan.seed ^ ((t as u64 + 1) << 56);
                work.writers.push(std::thread::spawn(move || {
                    direct_writer(&path, seed, &flags)
                }));
            }
        }
        let dir = fs.mnt.join("snapshots");
        work.snapshots = Some(std::thread::spawn(move || {
            snapshot_loop(&dir, cycle, &flags)
        }));
        work
    }

    /// Writes completed by fio's loop device since it was attached (0 without fio).
    fn fio_writes(&self) -> u64 {
        self.loop_device.as_ref().map_or(0, |d| {
            loop_writes(&d.dev).saturating_sub(self.loop_writes_before)
        })
    }

    /// Whether fio (if any) still runs; its output otherwise.
    fn fio_exited(&mut self) -> Option<String> {
        let status = self.fio.as_mut()?.try_wait().ok().flatten()?;
        Some(format!(
            "fio exited early ({status}):\n{}",
            fs::read_to_string(&self.fio_output).unwrap_or_default()
        ))
    }

    /// After the kill: stops everything, detaches the loop device, joins the threads.
    fn finish(mut self) -> (Vec<WriterReport>, SnapLog) {
        self.halt();
        if let Some(device) = self.loop_device.take() {
            device.detach();
        }
        let writers = std::mem::take(&mut self.writers);
        let snapshots = self.snapshots.take().expect("snapshot loop");
        wait_until(
            "writer and snapshot threads to exit after the kill",
            Duration::from_secs(60),
            || snapshots.is_finished() && writers.iter().all(|h| h.is_finished()),
        );
        let snaps = snapshots.join().expect("snapshot loop");
        let writers = writers
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect();
        (writers, snaps)
    }

    fn halt(&mut self) {
        self.flags.dying.store(true, Ordering::SeqCst);
        self.flags.stop.store(true, Ordering::SeqCst);
        if let Some(mut fio) = self.fio.take() {
            // Its own process group (see spawn_fio): nothing of it outlives the cycle.
            // SAFETY: kill(2) has no memory effects; fio is our unreaped child.
            unsafe { libc::kill(-(fio.id() as i32), libc::SIGKILL) };
            let _ = fio.wait();
        }
    }
}

impl Drop for Workload {
    /// On a panic: no writer or loop device outlives the test (threads exit on `stop`).
    fn drop(&mut self) {
        self.halt();
        self.loop_device.take();
    }
}

/// Writes completed by a block device (`/sys/block/<dev>/stat`), since it was set up.
fn loop_writes(dev: &Path) -> u64 {
    let name = dev.file_name().expect("loop device name");
    fs::read_to_string(Path::new("/sys/block").join(name).join("stat"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(4)?.parse().ok())
        .unwrap_or(0)
}

/// Two fio jobs writing 4-64 KiB at random 4 KiB-aligned offsets of the first 256 KiB,
/// one of them with an `fdatasync` every 4 writes; runs until killed. The jobs are
/// threads (forked job processes were seen to outlive a killed fio parent, stuck), in
/// a process group of their own.
fn spawn_fio(device: &Path, output: &Path, seed: u64) -> Child {
    let args = [
        format!("--filename={}", device.display()),
        format!("--output={}", output.display()),
        "--ioengine=libaio".into(),
        "--direct=1".into(),
        "--iodepth=8".into(),
        "--rw=randwrite".into(),
        "--bsrange=4k-64k".into(),
        "--blockalign=4k".into(),
        "--offset=0".into(),
        format!("--size={}", HOT_BYTES),
        "--norandommap".into(),
        "--refill_buffers".into(),
        "--time_based".into(),
        "--runtime=3600".into(),
        "--thread".into(),
        "--name=synced".into(),
        format!("--randseed={}", seed % (1 << 32)),
        "--fdatasync=4".into(),
        "--name=unsynced".into(),
        format!("--randseed={}", (seed >> 32) + 1),
    ];
    Command::new("fio")
        .args(&args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run fio: {e}"))
}

/// A 4 KiB-aligned buffer for `O_DIRECT`.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + PAGE as usize];
        let start = raw.as_ptr().align_offset(PAGE as usize);
        Aligned { raw, start }
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.start..self.start + len]
    }
}

/// One `O_DIRECT` writer: single pages of the hot blocks (so that writers change
/// different pages of one block at once), spans across blocks, and whole blocks; every
/// write carries fresh bytes; an `fdatasync` after about one write in four.
fn direct_writer(path: &Path, seed: u64, flags: &Flags) -> WriterReport {
    let mut report = WriterReport::default();
    let file = match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(file) => file,
        Err(e) => {
            if !flags.dying.load(Ordering::SeqCst) {
                report.unexpected = Some(format!("open O_DIRECT: {e}"));
            }
            return report;
        }
    };
    let mut rng = Rng::new(seed);
    let mut buf = Aligned::new(64 * KIB as usize);
    let pages = HOT_BYTES / PAGE;
    let block_pages = 64 * KIB / PAGE;
    while !flags.stop.load(Ordering::SeqCst) {
        let (first, count) = match rng.below(4) {
            0 | 1 => (rng.below(pages), 1),
            2 => {
                let first = rng.below(pages);
                (first, (1 + rng.below(block_pages)).min(pages - first))
            }
            _ => (rng.below(pages / block_pages) * block_pages, block_pages),
        };
        let data = buf.get((count * PAGE) as usize);
        let mut state = rng.next() | 1;
        for word in data.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let result = file.write_all_at(data, first * PAGE).and_then(|()| {
            report.writes += 1;
            if rng.below(4) == 0 {
                report.syncs += 1;
                file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = result {
            if !flags.dying.load(Ordering::SeqCst) {
                report.unexpected = Some(format!(
                    "write of {} KiB at {} KiB (or its fdatasync): {e}",
                    count * PAGE / KIB,
                    first * PAGE / KIB
                ));
            }
            break;
        }
    }
    report
}

/// `mkdir snapshots/v@c<cycle>-<k>` back to back; on `EBUSY` reads the pending
/// snapshot's status and tries again.
fn snapshot_loop(dir: &Path, cycle: u64, flags: &Flags) -> SnapLog {
    let mut log = SnapLog::default();
    let mut k = 1;
    let status = |id: &str| {
        fs::read_to_string(dir.join(id).join("status"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    while !flags.stop.load(Ordering::SeqCst) {
        let id = format!("{VOLUME}@c{cycle}-{k}");
        if flags.armed.load(Ordering::SeqCst) && !flags.entering.load(Ordering::SeqCst) {
            // Kill during a mkdir that freezes, not one refused with EBUSY.
            let previous = log.created.last().map(|p| status(p));
            if previous.as_deref() == Some("pending") {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            flags.entering.store(true, Ordering::SeqCst);
        }
        log.in_flight = Some(id.clone());
        let start = Instant::now();
        match fs::create_dir(dir.join(&id)) {
            Ok(()) => {
                if flags.entering.load(Ordering::SeqCst) {
                    flags.frozen.store(true, Ordering::SeqCst);
                }
                log.mkdir_micros.push(start.elapsed().as_micros() as u64);
                log.in_flight = None;
                log.created.push(id);
                k += 1;
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if !flags.frozen.load(Ordering::SeqCst) {
                    // The armed mkdir did not freeze after all: arm the next one.
                    flags.entering.store(false, Ordering::SeqCst);
                }
                log.in_flight = None;
                log.busy += 1;
                if let Some(previous) = log.created.last() {
                    match status(previous).as_str() {
                        "completed" if log.seen_completed.last() != Some(previous) => {
                            log.seen_completed.push(previous.clone())
                        }
                        "error" if log.seen_error.last() != Some(previous) => {
                            log.seen_error.push(previous.clone())
                        }
                        _ => std::thread::sleep(Duration::from_micros(300)),
                    }
                }
            }
            Err(e) => {
                if !flags.dying.load(Ordering::SeqCst) {
                    log.unexpected = Some(format!("mkdir snapshots/{id}: {e}"));
                    log.in_flight = None;
                }
                break;
            }
        }
    }
    log
}

/// Waits `warmup`, arms the snapshot loop, spins until `event` is raised and then for
/// `delay` (spinning, not sleeping: a freeze lasts microseconds); returns `what` if the
/// event came (within 30 s).
fn kill_moment(
    flags: &Flags,
    warmup: Duration,
    event: &AtomicBool,
    delay: Duration,
    what: &'static str,
) -> &'static str {
    std::thread::sleep(warmup);
    flags.armed.store(true, Ordering::SeqCst);
    let armed = Instant::now();
    while !event.load(Ordering::SeqCst) && armed.elapsed() < Duration::from_secs(30) {
        std::hint::spin_loop();
    }
    let seen = Instant::now();
    while seen.elapsed() < delay {
        std::hint::spin_loop();
    }
    if event.load(Ordering::SeqCst) {
        what
    } else {
        " (the armed mkdir never came)"
    }
}

/// Kills the daemon when a phase overruns: its FUSE calls then fail with `ENOTCONN`,
/// so a hung daemon fails the test with a message instead of hanging it.
struct Watchdog {
    /// Daemon pid, deadline and phase while armed. Held while killing, so that once
    /// [`Watchdog::disarm`] returns the pid (which may then be reaped) is never signalled.
    armed: Arc<Mutex<Option<(u32, Instant, String)>>>,
    fired: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn new() -> Watchdog {
        let armed: Arc<Mutex<Option<(u32, Instant, String)>>> = Arc::default();
        let fired: Arc<Mutex<Option<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (armed, fired, stop) = (armed.clone(), fired.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                    let mut armed = armed.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some((pid, deadline, phase)) = armed.as_ref()
                        && Instant::now() > *deadline
                    {
                        eprintln!("watchdog: {phase} overran; kill -9 of the daemon");
                        // SAFETY: kill(2) has no memory effects; pid is our unreaped child.
                        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                        *fired.lock().unwrap_or_else(|p| p.into_inner()) = Some(phase.clone());
                        *armed = None;
                    }
                }
            })
        };
        Watchdog {
            armed,
            fired,
            stop,
            thread: Some(thread),
        }
    }

    fn arm(&self, pid: u32, limit: Duration, phase: String) {
        *self.armed.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((pid, Instant::now() + limit, phase));
    }

    fn disarm(&self) {
        *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn fired(&self) -> Option<String> {
        self.fired.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.disarm();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------
// What is known about each snapshot across restarts.
// ---------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Known {
    /// Its `mkdir` returned 0 (or it was listed after a restart): it must stay listed.
    must_exist: bool,
    /// It was `completed` once: it must stay `completed`, with the same contents.
    must_complete: bool,
    /// Content hash recorded when first read `completed`.
    digest: Option<blake3::Hash>,
    /// Creation order, for pruning.
    order: u64,
}

struct Stress {
    fs: Ebsfs,
    watchdog: Watchdog,
    seed: u64,
    block_bytes: u64,
    cycles: u64,
    cycle: u64,
    initial: Vec<u8>,
    known: BTreeMap<String, Known>,
    /// Snapshots whose `rmdir` returned 0.
    deleted: BTreeSet<String>,
    next_order: u64,
    /// Length of the daemon log when it was last started.
    log_mark: usize,
    /// The cycle whose schedule the current cycle runs (itself, unless
    /// `EBSFS_STRESS_ONLY_CYCLE` is set).
    plan_cycle: u64,
}

impl Stress {
    #[track_caller]
    fn fail(&self, what: &str) -> ! {
        self.watchdog.disarm();
        let what = match self.watchdog.fired() {
            Some(phase) => format!("{what}\n(the watchdog killed the daemon: {phase} overran)"),
            None => what.to_string(),
        };
        panic!(
            "stress_kill9 FAILED at cycle {} of {}: {what}\n\
             replay the run: EBSFS_STRESS_SEED={seed} EBSFS_STRESS_CYCLES={}\n\
             retry this cycle's schedule many times: EBSFS_STRESS_SEED={seed} \
             EBSFS_STRESS_ONLY_CYCLE={} EBSFS_STRESS_CYCLES=50\n{}",
            self.cycle,
            self.cycles,
            self.cycle,
            self.plan_cycle,
            self.log_excerpt(),
            seed = self.seed,
        );
    }

    /// The end of the killed daemon's log and the log of the last start, without
    /// the snapshot loop's `EBUSY` warnings.
    fn log_excerpt(&self) -> String {
        let log = self.fs.log();
        let mut mark = self.log_mark.min(log.len());
        while !log.is_char_boundary(mark) {
            mark -= 1;
        }
        let relevant = |text: &str| {
            text.lines()
                .filter(|l| !l.contains("already has a snapshot pending"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "daemon log before the last kill (end, without EBUSY warnings):\n{}\n\
             daemon log since the last start:\n{}",
            tail_lines(&relevant(&log[..mark]), 25),
            tail_lines(&relevant(&log[mark..]), 60)
        )
    }

    fn know(&mut self, id: &str) -> &mut Known {
        if !self.known.contains_key(id) {
            self.next_order += 1;
            let order = self.next_order;
            self.known.insert(
                id.to_string(),
                Known {
                    order,
                    ..Known::default()
                },
            );
        }
        self.known.get_mut(id).expect("just inserted")
    }

    fn status(&self, id: &str) -> String {
        self.fs.status(id)
    }

    /// Waits until `id` is no longer pending; fails the test after [`FINISH_TIMEOUT`].
    fn wait_final(&self, id: &str) -> String {
        let start = Instant::now();
        loop {
            let status = self.status(id);
            if status != "pending" {
                return status;
            }
            if start.elapsed() > FINISH_TIMEOUT {
                self.fail(&format!(
                    "snapshot {id} is still pending {FINISH_TIMEOUT:?} after the restart"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reads a completed image and checks its size and its untouched region.
    fn read_image(&self, id: &str) -> Vec<u8> {
        let bytes = fs::read(image(&self.fs, id)).unwrap_or_else(|e| {
            self.fail(&format!("completed snapshot {id}: reading volume.img: {e}"))
        });
        self.check_untouched(&format!("snapshot {id}"), &bytes);
        bytes
    }

    /// Outside the written region, `bytes` must be the initial contents.
    fn check_untouched(&self, what: &str, bytes: &[u8]) {
        if bytes.len() as u64 != VOLUME_BYTES {
            self.fail(&format!(
                "{what} is {} bytes, expected {VOLUME_BYTES}",
                bytes.len()
            ));
        }
        let hot = HOT_BYTES as usize;
        if let Some(offset) = first_difference(&bytes[hot..], &self.initial[hot..]) {
            self.fail(&format!(
                "{what} differs from the initial contents at offset {}, outside the \
                 region anything wrote ({})",
                hot + offset,
                describe_difference(&bytes[hot..], &self.initial[hot..], hot)
            ));
        }
    }

    /// Every check made after a restart; see the module comment.
    fn check_after_restart(&mut self, snaps: &SnapLog) -> String {
        let listed = listed_snapshots(&self.fs);
        for id in &snaps.created {
            self.know(id).must_exist = true;
        }
        for id in &snaps.seen_completed {
            self.know(id).must_complete = true;
        }
        for (id, known) in &self.known {
            if known.must_exist && !listed.contains(id) {
                self.fail(&format!(
                    "snapshot {id} is gone after the restart, though no rmdir was issued \
                     (its mkdir had returned{})",
                    if known.must_complete {
                        "; it was completed"
                    } else {
                        ""
                    }
                ));
            }
        }
        let mut completed = Vec::new();
        for id in &listed {
            if self.deleted.contains(id) {
                self.fail(&format!(
                    "snapshot {id} is listed again after the restart, but its rmdir had returned"
                ));
            }
            if !self.known.contains_key(id) && snaps.in_flight.as_deref() != Some(id.as_str()) {
                self.fail(&format!(
                    "snapshot {id} is listed but was never created (listed: {listed:?})"
                ));
            }
            self.know(id).must_exist = true;
            let status = self.wait_final(id);
            let must_complete = self.known[id].must_complete;
            match status.as_str() {
                "completed" => completed.push(id.clone()),
                other => self.fail(&format!(
                    "snapshot {id} is {other:?} after the restart{}; info: {:?}",
                    if must_complete {
                        ", but it was completed before"
                    } else {
                        ", but an interrupted capture must resume"
                    },
                    fs::read_to_string(self.fs.snapshot(id).join("info")).unwrap_or_default()
                )),
            }
        }
        // Snapshots kept for the next cycles are read in full and hashed; the many
        // others (deleted below) only read their written region, to keep cycles short.
        let keep = self.keep(&completed);
        for id in &completed {
            if keep.contains(id) || self.known[id].digest.is_some() {
                let bytes = self.read_image(id);
                let digest = blake3::hash(&bytes);
                match self.known[id].digest {
                    Some(recorded) if recorded != digest => self.fail(&format!(
                        "completed snapshot {id} changed across a restart: {}",
                        self.describe_change(&bytes, recorded)
                    )),
                    _ => self.know(id).digest = Some(digest),
                }
            } else {
                self.read_hot(id);
            }
            self.know(id).must_complete = true;
        }

        let live = fs::read(self.fs.volume(VOLUME))
            .unwrap_or_else(|e| self.fail(&format!("reading volumes/{VOLUME}.img: {e}")));
        self.check_untouched("the live volume", &live);

        let check = format!("{VOLUME}@check-{}", self.cycle);
        if let Err(e) = mkdir_snapshot(&self.fs, &check) {
            self.fail(&format!(
                "mkdir snapshots/{check} with no writer and no snapshot pending: {e}"
            ));
        }
        self.know(&check).must_exist = true;
        let status = self.wait_final(&check);
        if status != "completed" {
            self.fail(&format!(
                "{check} ended {status:?}; info: {:?}",
                fs::read_to_string(self.fs.snapshot(&check).join("info")).unwrap_or_default()
            ));
        }
        let snap = self.read_image(&check);
        if let Some(offset) = first_difference(&snap, &live) {
            self.fail(&format!(
                "fresh snapshot {check} differs from the live volume (no writer running): \
                 first differing offset {offset} (block {} of {} KiB, page {} within it); {}",
                offset as u64 / self.block_bytes,
                self.block_bytes / KIB,
                (offset as u64 % self.block_bytes) / PAGE,
                describe_difference(&snap, &live, 0)
            ));
        }
        let known = self.know(&check);
        known.must_complete = true;
        known.digest = Some(blake3::hash(&snap));
        let summary = format!(
            "{} snapshots listed, all completed; {check} equals the live volume",
            listed.len(),
        );
        let keep: Vec<String> = keep.into_iter().chain([check]).collect();
        self.prune(&listed, &keep);
        summary
    }

    /// `v@base` and the newest completed run snapshots: kept until the next cycles,
    /// so that their contents are compared across restarts.
    fn keep(&self, completed: &[String]) -> Vec<String> {
        let base = format!("{VOLUME}@base");
        let mut run: Vec<(u64, &String)> = completed
            .iter()
            .filter(|id| !id.contains("@check-") && **id != base)
            .map(|id| (self.known[id.as_str()].order, id))
            .collect();
        run.sort();
        run.iter()
            .rev()
            .take(KEEP_RUN_SNAPSHOTS)
            .map(|(_, id)| id.to_string())
            .chain([base])
            .collect()
    }

    /// Reads the written region of a completed image (its contents are not known).
    fn read_hot(&self, id: &str) {
        let mut buf = vec![0u8; HOT_BYTES as usize];
        if let Err(e) =
            fs::File::open(image(&self.fs, id)).and_then(|f| f.read_exact_at(&mut buf, 0))
        {
            self.fail(&format!(
                "completed snapshot {id}: reading its first {HOT_BYTES} bytes: {e}"
            ));
        }
    }

    /// What changed in an image whose hash was recorded: `v@base` and the checks
    /// have known contents, so name the first differing offset for them.
    fn describe_change(&self, bytes: &[u8], recorded: blake3::Hash) -> String {
        let mut what = format!(
            "content hash {} was {}",
            blake3::hash(bytes).to_hex(),
            recorded.to_hex()
        );
        if recorded == blake3::hash(&self.initial)
            && let Some(offset) = first_difference(bytes, &self.initial)
        {
            what += &format!(
                "; first differing offset from the initial contents {offset} ({})",
                describe_difference(bytes, &self.initial, 0)
            );
        }
        what
    }

    /// Deletes every listed snapshot but `keep`.
    fn prune(&mut self, listed: &[String], keep: &[String]) {
        for id in listed {
            if keep.contains(id) {
                continue;
            }
            if let Err(e) = fs::remove_dir(self.fs.snapshot(id)) {
                self.fail(&format!("rmdir snapshots/{id} ({}): {e}", self.status(id)));
            }
            self.known.remove(id);
            self.deleted.insert(id.clone());
        }
    }
}

fn percentile(values: &[u64], p: usize) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    match sorted.len() {
        0 => 0,
        n => sorted[((n - 1) * p / 100).min(n - 1)],
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.chunks(4096)
        .zip(b.chunks(4096))
        .position(|(x, y)| x != y)
        .map(|chunk| {
            let start = chunk * 4096;
            start
                + a[start..]
                    .iter()
                    .zip(&b[start..])
                    .position(|(x, y)| x != y)
                    .expect("chunks differ")
        })
}

/// Which 4 KiB pages differ (offsets counted from `base`).
fn describe_difference(a: &[u8], b: &[u8], base: usize) -> String {
    let pages: Vec<usize> = a
        .chunks(PAGE as usize)
        .zip(b.chunks(PAGE as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| (base + i * PAGE as usize) / KIB as usize)
        .collect();
    let shown: Vec<String> = pages.iter().take(32).map(|k| format!("{k}K")).collect();
    format!(
        "{} differing 4 KiB pages at {}{}",
        pages.len(),
        shown.join(" "),
        if pages.len() > shown.len() {
            " ..."
        } else {
            ""
        }
    )
}

// ---------------------------------------------------------------------------------
// The test.
// ---------------------------------------------------------------------------------

#[test]
fn kill9_during_colliding_direct_writes_and_back_to_back_snapshots() {
    if !require_fuse() {
        return;
    }
    let seed = env_u64("EBSFS_STRESS_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let cycles = env_u64("EBSFS_STRESS_CYCLES").unwrap_or(DEFAULT_CYCLES);
    let only_cycle = env_u64("EBSFS_STRESS_ONLY_CYCLE");
    let mut rng = Rng::new(seed);
    let (block_size, block_bytes) = if rng.below(4) == 0 {
        ("4KiB", 4 * KIB)
    } else {
        ("64KiB", 64 * KIB)
    };
    eprintln!(
        "stress_kill9: EBSFS_STRESS_SEED={seed} EBSFS_STRESS_CYCLES={cycles}{} \
         (block_size {block_size})",
        only_cycle.map_or(String::new(), |c| format!(" EBSFS_STRESS_ONLY_CYCLE={c}"))
    );
    let started = Instant::now();

    let fs = Ebsfs::start_with(&format!("block_size = \"{block_size}\"\n"));
    let initial = pattern(VOLUME_BYTES as usize, rng.next());
    fs::write(fs.volume(VOLUME), &initial).expect("write the initial contents");
    let mut stress = Stress {
        fs,
        watchdog: Watchdog::new(),
        seed,
        block_bytes,
        cycles,
        cycle: 0,
        initial,
        known: BTreeMap::new(),
        deleted: BTreeSet::new(),
        next_order: 0,
        log_mark: 0,
        plan_cycle: 0,
    };
    let base = format!("{VOLUME}@base");
    let limit = CHECK_TIMEOUT;
    stress
        .watchdog
        .arm(stress.fs.pid(), limit, format!("{base} ({limit:?})"));
    take_snapshot(&stress.fs, &base);
    let bytes = stress.read_image(&base);
    if let Some(offset) = first_difference(&bytes, &stress.initial) {
        stress.fail(&format!(
            "{base} differs from the initial contents at {offset}"
        ));
    }
    let known = stress.know(&base);
    known.must_exist = true;
    known.must_complete = true;
    known.digest = Some(blake3::hash(&bytes));
    stress.watchdog.disarm();

    // The schedule of one cycle, for EBSFS_STRESS_ONLY_CYCLE.
    let only_plan = only_cycle.map(|n| {
        let plans: Vec<Plan> = (0..n.max(1)).map(|_| Plan::random(&mut rng)).collect();
        *plans.last().expect("one plan")
    });
    for cycle in 1..=cycles {
        stress.cycle = cycle;
        stress.plan_cycle = only_cycle.unwrap_or(cycle);
        let plan = only_plan.unwrap_or_else(|| Plan::random(&mut rng));
        let cycle_start = Instant::now();
        let mut work = Workload::start(&stress.fs, &plan, cycle);
        let moment = match plan.kill {
            KillAt::After(delay) => {
                std::thread::sleep(delay);
                ""
            }
            KillAt::InMkdir { warmup, delay } => kill_moment(
                &work.flags,
                warmup,
                &work.flags.entering,
                delay,
                " inside a mkdir",
            ),
            KillAt::AfterFreeze { warmup, delay } => kill_moment(
                &work.flags,
                warmup,
                &work.flags.frozen,
                delay,
                " after a freeze",
            ),
        };
        if let Some(early) = work.fio_exited() {
            stress.fail(&early);
        }
        let fio_writes = work.fio_writes();
        work.flags.dying.store(true, Ordering::SeqCst);
        stress.fs.signal(libc::SIGKILL);
        stress.fs.kill9();
        let (writers, snaps) = work.finish();
        for (t, report) in writers.iter().enumerate() {
            if let Some(e) = &report.unexpected {
                stress.fail(&format!("writer thread {t}, daemon running: {e}"));
            }
        }
        if let Some(e) = &snaps.unexpected {
            stress.fail(&format!("snapshot loop, daemon running: {e}"));
        }
        eprintln!(
            "cycle {cycle}: {plan:?}: killed after {:?}{}; fio writes {fio_writes}, thread writes {:?}; \
             {} snapshots created (mkdir median {} µs, max {} µs), {} EBUSY, \
             {} seen completed, seen error {:?}, in flight {:?}",
            cycle_start.elapsed(),
            moment,
            writers
                .iter()
                .map(|r| (r.writes, r.syncs))
                .collect::<Vec<_>>(),
            snaps.created.len(),
            percentile(&snaps.mkdir_micros, 50),
            percentile(&snaps.mkdir_micros, 100),
            snaps.busy,
            snaps.seen_completed.len(),
            snaps.seen_error,
            snaps.in_flight,
        );
        let restart_start = Instant::now();
        stress.log_mark = fs::metadata(stress.fs.root.path().join("ebsfs.log"))
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        if let Err(refusal) = stress.fs.try_restart() {
            let first = refusal
                .stderr
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            stress.fail(&format!(
                "the data directory does not mount again ({}): {first}",
                refusal.status
            ));
        }
        let restart_time = restart_start.elapsed();
        stress.watchdog.arm(
            stress.fs.pid(),
            CHECK_TIMEOUT,
            format!("the checks after restart {cycle} ({CHECK_TIMEOUT:?})"),
        );
        let summary = stress.check_after_restart(&snaps);
        stress.watchdog.disarm();
        eprintln!(
            "cycle {cycle}: mounted again in {restart_time:?}; {summary}; cycle took {:?}",
            cycle_start.elapsed()
        );
    }
    eprintln!(
        "stress_kill9: {cycles} cycles passed in {:?} (EBSFS_STRESS_SEED={seed})",
        started.elapsed()
    );
}

#!/usr/bin/env python3
"""Helpers for bench/run.sh: fio JSON parsing, snapshot timing, block writers,
copies of snapshots and their hydration, daemon statistics and the final report. Standard library only (Python >= 3.11).

Every subcommand that measures something prints one JSON record on stdout (run.sh
appends it to the run's records file) and a short human line on stderr.
"""

import argparse
import hashlib
import json
import math
import mmap
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time

try:
    import tomllib
except ImportError:  # pragma: no cover - Debian 12 has Python 3.11
    tomllib = None

UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}


def parse_size(value):
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"not a size: {value!r}")
    return int(m.group(1)) * UNITS[m.group(2).lower()]


def emit(record):
    print(json.dumps(record, sort_keys=True))
    sys.stdout.flush()


def say(text):
    print(f"         {text}", file=sys.stderr)
    sys.stderr.flush()


# ---------------------------------------------------------------- fio results

VERIFY_PATTERNS = (
    "verify:", "bad magic header", "bad header", "crc32c: verify failed",
    "verify failed", "got pattern", "bad pattern",
)


def load_fio_json(path):
    """fio may print 'fio: pid=..., err=...' lines before the JSON document."""
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    start = text.find("{\n")
    if start < 0:
        start = text.find("{")
    if start < 0:
        return None
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return None


def percentiles(side):
    for key in ("lat_ns", "clat_ns"):
        pct = side.get(key, {}).get("percentile")
        if pct:
            def pick(p):
                for k, v in pct.items():
                    if abs(float(k) - p) < 1e-6:
                        return v / 1000.0
                return None
            return pick(50.0), pick(99.0)
    return None, None


def cmd_fio_record(a):
    doc = load_fio_json(a.json)
    try:
        stderr = open(a.stderr, encoding="utf-8", errors="replace").read()
    except OSError:
        stderr = ""
    try:
        raw = open(a.json, encoding="utf-8", errors="replace").read()
    except OSError:
        raw = ""
    rec = {
        "type": "fio", "stack": a.stack, "job": a.job, "phase": a.phase,
        "target": a.target, "rc": a.rc, "desc": a.desc,
    }
    text = stderr + "\n" + (raw[: raw.find("{")] if "{" in raw else raw)
    msgs = [l.strip() for l in text.splitlines() if any(p in l for p in VERIFY_PATTERNS)]
    job = (doc or {}).get("jobs", [{}])[0] if doc else {}
    err = job.get("error", 0) if job else None
    rec["error"] = err
    rec["verify_failed"] = bool(msgs) or err == 84
    rec["verify_msgs"] = msgs[:5]
    rec["timed_out"] = a.rc in (124, 137)
    other = [l.strip() for l in stderr.splitlines() if l.strip() and l.strip() not in msgs]
    rec["stderr"] = other[-5:]
    if job:
        for side in ("read", "write"):
            s = job.get(side, {})
            rec[f"{side}_bytes"] = s.get("io_bytes", 0)
            rec[f"{side}_MBps"] = s.get("bw_bytes", 0) / 1e6
            rec[f"{side}_iops"] = s.get("iops", 0.0)
            rec[f"{side}_runtime_ms"] = s.get("runtime", 0)
            p50, p99 = percentiles(s)
            rec[f"{side}_p50_us"] = p50
            rec[f"{side}_p99_us"] = p99
            lat = s.get("lat_ns", {}).get("mean")
            rec[f"{side}_mean_us"] = lat / 1000.0 if lat else None
    rec["ok"] = bool(job) and a.rc == 0 and not err and not rec["verify_failed"]
    emit(rec)
    # Human line.
    if rec["verify_failed"]:
        state = "VERIFY FAILED"
    elif rec["timed_out"]:
        state = "TIMED OUT"
    elif not rec["ok"]:
        state = f"FAILED (rc={a.rc}, fio error={err})"
    else:
        state = "ok"
    parts = []
    if job:
        if a.phase in ("write", "prefill", "fg"):
            parts.append(f"write {rec['write_MBps']:.1f} MB/s {rec['write_iops']:.0f} IOPS")
            if rec["read_bytes"]:
                parts.append(f"verified {rec['read_bytes'] / 2**20:.0f} MiB")
        else:
            parts.append(f"read {rec['read_MBps']:.1f} MB/s {rec['read_iops']:.0f} IOPS")
            if rec["read_p50_us"] is not None and a.job.endswith("qd1"):
                parts.append(f"p50 {rec['read_p50_us']:.1f} us p99 {rec['read_p99_us']:.1f} us")
    if job:
        parts.append(f"{job.get('elapsed', 0)} s")
    say(f"{a.stack}/{a.job} [{a.phase}]: {state}; " + ", ".join(parts))
    for m in msgs[:3]:
        say(f"  !! {m}")
    if not rec["ok"] and not msgs:
        for m in other[-3:]:
            say(f"  !! {m}")


# ------------------------------------------------------------------ snapshots

def read_small(path):
    """Reads a small file with os.read (no isatty ioctl, unlike open())."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(fd)


def snap_status(mnt, name):
    return read_small(os.path.join(mnt, "snapshots", name, "status")).strip()


def snap_info(mnt, name):
    text = read_small(os.path.join(mnt, "snapshots", name, "info"))
    if tomllib is None:
        out = {}
        for line in text.splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                v = v.strip().strip('"')
                out[k.strip()] = int(v) if v.isdigit() else v
        return out
    return tomllib.loads(text)


def wait_done(mnt, name, t0_ns, timeout, poll=0.002):
    """Polls status until it leaves pending; returns (status, seconds since t0)."""
    deadline = time.monotonic() + timeout
    while True:
        st = snap_status(mnt, name)
        now = time.perf_counter_ns()
        if st != "pending":
            return st, (now - t0_ns) / 1e9
        if time.monotonic() > deadline:
            return "TIMEOUT", (now - t0_ns) / 1e9
        time.sleep(poll)


def timed_mkdir(mnt, name):
    path = os.path.join(mnt, "snapshots", name)
    t0 = time.perf_counter_ns()
    os.mkdir(path)
    t1 = time.perf_counter_ns()
    return t0, (t1 - t0) / 1e6


def snapshot_record(mnt, name, status, mkdir_ms, capture_s, block_size):
    rec = {"type": "snapshot", "name": name, "status": status,
           "mkdir_ms": mkdir_ms, "capture_s": capture_s, "end_epoch": time.time()}
    try:
        info = snap_info(mnt, name)
        rec["info"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str))}
        cb = int(info.get("changed_blocks", 0))
        bs = int(info.get("block_size", block_size))
        rec["changed_blocks"] = cb
        rec["block_size"] = bs
        rec["stored_bytes"] = int(info.get("stored_bytes", 0))
        rec["changed_bytes"] = cb * bs
        if capture_s and capture_s > 0:
            rec["capture_MBps"] = cb * bs / capture_s / 1e6
    except (OSError, ValueError) as e:
        rec["info_error"] = str(e)
    return rec


def cmd_snap_mkdir(a):
    """mkdir a snapshot (timed); with --wait also wait for completion."""
    try:
        t0, ms = timed_mkdir(a.mnt, a.name)
    except OSError as e:
        emit({"type": "snapshot", "name": a.name, "status": "MKDIR FAILED", "error": str(e),
              "label": a.label})
        say(f"mkdir snapshots/{a.name}: FAILED: {e}")
        return 1
    if not a.wait:
        print(json.dumps({"t0_ns": t0, "mkdir_ms": ms}))
        say(f"mkdir snapshots/{a.name}: {ms:.2f} ms (capture running)")
        return 0
    st, secs = wait_done(a.mnt, a.name, t0, a.timeout)
    rec = snapshot_record(a.mnt, a.name, st, ms, secs, a.block_size)
    rec["label"] = a.label
    emit(rec)
    say(f"snapshot {a.name}: mkdir {ms:.2f} ms, {st} after {secs:.2f} s, "
        f"changed {rec.get('changed_bytes', 0) / 2**20:.1f} MiB, stored {rec.get('stored_bytes', 0) / 2**20:.1f} MiB"
        + (f", {rec['capture_MBps']:.0f} MB/s" if "capture_MBps" in rec else ""))
    return 0 if st == "completed" else 1


def cmd_snap_wait(a):
    st, secs = wait_done(a.mnt, a.name, a.t0_ns, a.timeout)
    rec = snapshot_record(a.mnt, a.name, st, a.mkdir_ms, secs, a.block_size)
    rec["label"] = a.label
    emit(rec)
    say(f"snapshot {a.name}: {st} after {secs:.2f} s, changed {rec.get('changed_bytes', 0) / 2**20:.1f} MiB"
        + (f", {rec['capture_MBps']:.0f} MB/s" if "capture_MBps" in rec else ""))
    return 0 if st == "completed" else 1


def cmd_snap_status(a):
    print(snap_status(a.mnt, a.name))


class DirectWriter:
    """O_DIRECT writes of fresh random data from a page-aligned buffer."""

    def __init__(self, path, length, seed):
        self.fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        self.buf = mmap.mmap(-1, length)
        self.rng = random.Random(seed)
        self.written = 0

    def write(self, offset, length):
        self.buf[:length] = self.rng.randbytes(length)
        view = memoryview(self.buf)[:length]
        n = os.pwrite(self.fd, view, offset)
        view.release()
        if n != length:
            raise OSError(f"short write at {offset}: {n} of {length}")
        self.written += length

    def close(self):
        os.close(self.fd)
        self.buf.close()


def cmd_write_blocks(a):
    """Changes a fraction of the volume's blocks: aligned whole blocks, or one 4 KiB
    write at a random 4 KiB-aligned place inside each chosen block."""
    size = os.stat(a.file).st_size
    nblocks = size // a.block_size
    count = max(1, round(nblocks * a.fraction)) if a.count is None else a.count
    rng = random.Random(a.seed)
    chosen = sorted(rng.sample(range(nblocks), count))
    io = a.block_size if a.mode == "aligned" else 4096
    w = DirectWriter(a.file, io, a.seed + 1)
    try:
        for b in chosen:
            off = b * a.block_size
            if a.mode == "scattered":
                off += rng.randrange(a.block_size // 4096) * 4096
            w.write(off, io)
        os.fsync(w.fd)
    finally:
        w.close()
    emit({"type": "io", "label": a.label, "target": "ebsfs", "blocks": count,
          "bytes": count * io, "mode": a.mode, "block_size": a.block_size})
    say(f"{a.label}: wrote {count} x {io // 1024} KiB ({a.mode}) to {os.path.basename(a.file)}")


def cmd_mkdir_series(a):
    """N timed mkdirs of one volume, each after `--between` scattered 4 KiB writes
    (none before the first), waiting for `completed` in between."""
    vol_file = os.path.join(a.mnt, "volumes", a.volume + ".img")
    size = os.stat(vol_file).st_size
    rng = random.Random(a.seed)
    lat, caps, ok = [], [], True
    moved = 0
    for i in range(a.count):
        if i > 0 and a.between > 0:
            w = DirectWriter(vol_file, 4096, a.seed + i)
            try:
                for _ in range(a.between):
                    w.write(rng.randrange(size // 4096) * 4096, 4096)
                os.fsync(w.fd)
            finally:
                moved += w.written
                w.close()
        name = f"{a.volume}@{a.prefix}{i + 1}"
        try:
            t0, ms = timed_mkdir(a.mnt, name)
        except OSError as e:
            say(f"mkdir snapshots/{name}: FAILED: {e}")
            ok = False
            emit({"type": "snapshot", "name": name, "status": "MKDIR FAILED", "error": str(e),
                  "label": a.label})
            break
        st, secs = wait_done(a.mnt, name, t0, a.timeout)
        lat.append(ms)
        caps.append(secs)
        say(f"snapshot {name}: mkdir {ms:.2f} ms, {st} after {secs:.2f} s")
        if st != "completed":
            ok = False
            emit(snapshot_record(a.mnt, name, st, ms, secs, 0) | {"label": a.label})
            break
    emit({"type": "mkdir_series", "label": a.label, "volume": a.volume, "volume_size": size,
          "latencies_ms": lat, "capture_s": caps, "ok": ok,
          "median_ms": statistics.median(lat) if lat else None})
    emit({"type": "io", "label": a.label + "-changes", "target": "ebsfs", "bytes": moved})
    return 0 if ok else 1


# ------------------------------------------------------- volumes from snapshots

def get_xattr(path, name):
    try:
        return os.getxattr(path, name).decode("utf-8", "replace")
    except OSError:
        return None


def allocated_bytes(path):
    """What `du` reports for a directory tree (allocated bytes)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def cmd_clone_time(a):
    """N copies of one snapshot into new volumes, each timed from the start of the
    command to its exit: `cp IMAGE volumes/NAME.img` or `ebsfs volume create NAME
    --from SNAPSHOT`. Each copy must have the image's size and name the snapshot as
    its source. A copy that makes the data directory grow by more than --max-growth
    (it is copying bytes, not sharing blocks) is stopped (SIGKILL; the request in
    flight in the daemon still finishes) and ends the series: a byte copy of a large
    snapshot would fill the disk."""
    image = os.path.join(a.mnt, "snapshots", a.snapshot, "volume.img")
    size = os.stat(image).st_size
    times, cli_ms, names, problems, grown = [], [], [], [], []
    fallback = None
    for i in range(a.count):
        name = f"{a.prefix}{i + 1}"
        dest = os.path.join(a.mnt, "volumes", name + ".img")
        if a.method == "cp":
            cmd = ["cp", image, dest]
        else:
            cmd = [a.bin, "volume", "create", name, "--from", a.snapshot, "--mount", a.mnt]
        base = allocated_bytes(a.data_dir)
        stopped = {}

        def guard(p):
            # Watches the data directory while the copy runs (first look after 50 ms).
            t_start = time.perf_counter()
            while p.poll() is None:
                time.sleep(0.05)
                g = allocated_bytes(a.data_dir) - base
                late = time.perf_counter() - t_start > a.max_seconds
                if (g > a.max_growth or late) and p.poll() is None:
                    stopped.update(after_ms=(time.perf_counter() - t_start) * 1e3, grown=g, late=late)
                    p.kill()
                    return

        t0 = time.perf_counter_ns()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watcher = threading.Thread(target=guard, args=(p,), daemon=True)
        watcher.start()
        out, err = p.communicate()
        t1 = time.perf_counter_ns()
        watcher.join()
        if stopped:
            # Let the daemon finish the request in flight, then count what it wrote.
            last, steady_since = -1, time.monotonic()
            settle_start = steady_since
            while time.monotonic() - steady_since < 2 and time.monotonic() - settle_start < 900:
                now = allocated_bytes(a.data_dir)
                if now != last:
                    last, steady_since = now, time.monotonic()
                time.sleep(0.2)
            fallback = {"name": name, "after_ms": stopped["after_ms"], "grown_at_stop": stopped["grown"],
                        "grown": allocated_bytes(a.data_dir) - base, "timed_out": stopped["late"]}
            names.append(name)
            say(f"{a.method} of {a.snapshot}: stopped after {stopped['after_ms']:.0f} ms: "
                + ("too slow" if stopped["late"] else
                   f"the data directory grew by {stopped['grown'] / 2**20:.0f} MiB (copying bytes, not sharing)")
                + f"; {fallback['grown'] / 2**20:.0f} MiB written in all")
            break
        if p.returncode != 0:
            problems.append(f"{' '.join(cmd)}: exit {p.returncode}: {err.strip()[:200]}")
            break
        g = allocated_bytes(a.data_dir) - base
        names.append(name)
        if g > a.max_growth:
            fallback = {"name": name, "after_ms": (t1 - t0) / 1e6, "grown_at_stop": g, "grown": g,
                        "timed_out": False, "finished": True}
            say(f"{a.method} of {a.snapshot}: the data directory grew by {g / 2**20:.0f} MiB "
                "(copied bytes, not shared)")
            break
        times.append((t1 - t0) / 1e6)
        grown.append(g)
        m = re.search(r"in ([0-9.]+) ms", out)
        if m:
            cli_ms.append(float(m.group(1)))
        got = os.stat(dest).st_size
        src = get_xattr(dest, "user.ebsfs.source")
        if got != size:
            problems.append(f"{name}: size {got}, the snapshot's is {size}")
        if src != a.snapshot:
            problems.append(f"{name}: user.ebsfs.source is {src!r}, not {a.snapshot!r} (not a copy by reference)")
    ok = not problems
    emit({"type": "clone_time", "label": a.label, "method": a.method, "snapshot": a.snapshot,
          "snapshot_size": size, "times_ms": times, "cli_ms": cli_ms, "names": names, "ok": ok,
          "grown": grown, "fallback": fallback, "problems": problems,
          "median_ms": statistics.median(times) if times else None})
    if times:
        say(f"{a.method} of {a.snapshot} ({size / 2**20:.0f} MiB) x{len(times)}: median "
            f"{statistics.median(times):.1f} ms (min {min(times):.1f}, max {max(times):.1f})")
    for pr in problems:
        say(f"  !! {pr}")
    return 0 if ok else 1


def cmd_hydrate_wait(a):
    """Polls `user.ebsfs.hydrated` of a copy until it reads 100%. Throughput: the
    share still to hydrate at the last poll that read the first value, over the time
    from that poll to the first that read 100% (a percent is integer-rounded down)."""
    size = os.stat(a.file).st_size
    start = time.perf_counter()
    deadline = time.monotonic() + a.timeout
    first = get_xattr(a.file, "user.ebsfs.hydrated")
    last_first_t = 0.0
    first_change = None
    value = first
    while True:
        now = time.perf_counter() - start
        value = get_xattr(a.file, "user.ebsfs.hydrated")
        if value == first:
            last_first_t = now
        elif first_change is None:
            first_change = (now, value)
        if value == "100%" or time.monotonic() > deadline:
            break
        time.sleep(a.poll)

    def pct(v):
        try:
            return int(str(v).rstrip("%"))
        except ValueError:
            return 0

    rec = {"type": "hydrate", "label": a.label, "file": os.path.basename(a.file), "size": size,
           "first_value": first, "final_value": value, "done_s": now, "ok": value == "100%",
           "start_s": last_first_t, "first_change": first_change}
    if rec["ok"] and value != first:
        secs = now - last_first_t
        moved = size * (100 - pct(first)) / 100
        rec["hydrate_s"] = secs
        rec["hydrate_MBps"] = moved / secs / 1e6 if secs > 0 else None
    emit(rec)
    if rec["ok"]:
        say(f"{rec['file']}: hydrated ({first} -> 100%) in {rec.get('hydrate_s', 0):.2f} s of work, "
            f"{now:.2f} s after the mount" + (f", {rec['hydrate_MBps']:.0f} MB/s" if rec.get("hydrate_MBps") else ""))
    else:
        say(f"{rec['file']}: still {value} after {now:.0f} s")
    return 0 if rec["ok"] else 1


def cmd_xattr(a):
    print(get_xattr(a.file, a.name) or "")


def cmd_config_set(a):
    """Copies a config with top-level keys set (KEY=TOML-VALUE), put first in the file
    so that they stay top-level whatever tables follow."""
    text = open(a.file, encoding="utf-8").read() if a.file and os.path.exists(a.file) else ""
    keys = dict(p.split("=", 1) for p in a.pairs)
    out, in_table = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("["):
            in_table = True
        m = re.match(r"\s*([A-Za-z0-9_-]+)\s*=", line)
        if not in_table and m and m.group(1) in keys:
            continue
        out.append(line)
    doc = "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n".join(out) + "\n"
    if tomllib:
        tomllib.loads(doc)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(doc)


# ---------------------------------------------------------------- misc helpers

def cmd_config(a):
    cfg = {}
    if a.file and os.path.exists(a.file):
        with open(a.file, "rb") as f:
            cfg = tomllib.load(f) if tomllib else {}
    bs = parse_size(cfg.get("block_size", "64KiB"))
    cache = parse_size(cfg.get("cache_size", "128MiB"))
    print(f"CFG_BLOCK_SIZE={bs}")
    print(f"CFG_CACHE_SIZE={cache}")


def cmd_size(a):
    print(parse_size(a.value))


def cmd_daemon_stats(a):
    pid = a.pid
    rec = {"type": "daemon", "label": a.label, "pid": pid}
    try:
        for line in open(f"/proc/{pid}/status"):
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                rec[k] = int(v.split()[0]) * 1024
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        rec["utime_s"] = int(fields[11]) / tck
        rec["stime_s"] = int(fields[12]) / tck
        rec["cpu_s"] = rec["utime_s"] + rec["stime_s"]
        for line in open(f"/proc/{pid}/io"):
            k, _, v = line.partition(":")
            if k in ("rchar", "wchar", "read_bytes", "write_bytes"):
                rec["io_" + k] = int(v)
    except OSError as e:
        rec["error"] = str(e)
    emit(rec)
    if "VmHWM" in rec:
        say(f"daemon {pid}: peak RSS {rec['VmHWM'] / 2**20:.1f} MiB, CPU {rec['cpu_s']:.1f} s")


def cmd_kv(a):
    rec = {"type": a.type}
    for item in a.pairs:
        k, _, v = item.partition("=")
        try:
            rec[k] = int(v)
        except ValueError:
            try:
                rec[k] = float(v)
            except ValueError:
                rec[k] = v
    emit(rec)


# --------------------------------------------------------------------- report

JOBS = [
    # key, label, phase, metric, unit
    ("seqwrite", "seq write 1 MiB QD8", "write", "MBps", "MB/s"),
    ("seqread", "seq read 1 MiB QD8", "read", "MBps", "MB/s"),
    ("randwrite", "rand write 4 KiB QD32", "write", "iops", "IOPS"),
    ("randread", "rand read 4 KiB QD32", "read", "iops", "IOPS"),
    ("randreadqd1", "rand read 4 KiB QD1", "read", "iops", "IOPS"),
    ("fsyncwrite", "rand write 4 KiB QD1 fsync=1", "write", "iops", "IOPS"),
]
PLAIN_TARGETS = {"seqwrite": 0.9, "seqread": 0.9, "randwrite": 0.7, "randread": 0.7}
QCOW_TARGET = 3.0
STACK_LABELS = {"plain": "plain (loop dio)", "ebsfs-dio": "ebsfs (loop dio)",
                "ebsfs-buf": "ebsfs (loop buffered)", "qcow2": "qcow2 peer"}


def fmt(v, digits=None):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if digits is None:
        digits = 0 if abs(v) >= 100 else (1 if abs(v) >= 10 else 2)
    return f"{v:,.{digits}f}"


def verdict(ok):
    if ok is None:
        return "n/a"
    return "PASS" if ok else "**MISS**"


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else 0.0


def cmd_report(a):
    recs = []
    for line in open(a.records):
        line = line.strip()
        if line:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    meta = {}
    for r in recs:
        if r["type"] == "meta":
            meta.update({k: v for k, v in r.items() if k != "type"})
    fio = [r for r in recs if r["type"] == "fio"]
    md, fatal, misses, failures, notes = [], [], [], [], []
    summary = {"meta": meta, "stacks": {}, "ratios": {}, "snapshots": {}, "clones": {}, "daemon": {},
               "targets": [], "failures": [], "incomplete": bool(a.incomplete)}

    mode = meta.get("mode", "?")
    md.append(f"# ebsfs benchmark — {mode} mode — {meta.get('date', '?')}")
    md.append("")
    if a.incomplete:
        md.append(f"**INCOMPLETE RUN: {a.incomplete}** — figures below are only those measured before it stopped.")
        md.append("")
    md.append(f"- ebsfs commit `{meta.get('commit', '?')}`; host {meta.get('host', '?')}, kernel {meta.get('kernel', '?')}, "
              f"{meta.get('cpus', '?')} CPUs, {meta.get('mem', '?')} RAM; {meta.get('fio', '?')}")
    md.append(f"- work dir {meta.get('workdir', '?')} ({meta.get('workfs', '?')}); config {meta.get('config', '?')} "
              f"(block_size {fmt_bytes(meta.get('block_size'))}, cache_size {fmt_bytes(meta.get('cache_size'))})")
    md.append(f"- stack fio files: {fmt_bytes(meta.get('file_size'))} seq/rand files, rand write io {fmt_bytes(meta.get('rw_io'))}, "
              f"rand read io {fmt_bytes(meta.get('rr_io'))}, QD1 read io {fmt_bytes(meta.get('r1_io'))}, "
              f"fsync file {fmt_bytes(meta.get('fs_file'))} / io {fmt_bytes(meta.get('fs_io'))}, random-job cap {meta.get('rand_cap', '?')} s; "
              f"stack figures are medians of {meta.get('rounds', '1')} interleaved round(s)")
    if mode == "smoke":
        md.append("- **smoke mode: tiny sizes, the figures only show that the harness works; PASS/MISS is not meaningful.**")
    md.append("")

    # ---- verification summary
    def is_fatal_stack(stack):
        return stack == "plain" or stack.startswith("ebsfs") or stack in ("snap", "clone", "bucket")

    bad = [r for r in fio if not r.get("ok")]
    for r in bad:
        what = ("VERIFY FAILED" if r.get("verify_failed") else "TIMED OUT" if r.get("timed_out")
                else f"FAILED rc={r.get('rc')} fio error={r.get('error')}")
        detail = "; ".join((r.get("verify_msgs") or r.get("stderr") or [])[:2])
        line = f"{r['stack']}/{r['job']} ({r['phase']}, {r.get('desc', '')}): {what}" + (f" — {detail}" if detail else "")
        (fatal if is_fatal_stack(r["stack"]) else failures).append(line)
    for r in recs:
        if r["type"] == "failure":
            (fatal if r.get("fatal", 1) else failures).append(f"{r.get('what')}: {r.get('detail', '')}")
        if r["type"] == "snapshot" and r.get("status") not in ("completed", None):
            fatal.append(f"snapshot {r['name']}: status {r.get('status')} {r.get('error', '')}".strip())
        if r["type"] == "mkdir_series" and not r.get("ok"):
            fatal.append(f"mkdir series on volume {r.get('volume')}: did not complete")
        if r["type"] == "check" and not r.get("ok"):
            fatal.append(f"{r.get('what')}: {r.get('detail', '')}")
        if r["type"] == "clone_time" and not r.get("ok"):
            fatal.append(f"copies of snapshot {r.get('snapshot')} ({r.get('method')}): " + "; ".join(r.get("problems") or []))
        if r["type"] == "hydrate" and not r.get("ok"):
            fatal.append(f"hydration of {r.get('file')}: still {r.get('final_value')} after {r.get('done_s', 0):.0f} s")
        if r["type"] == "note":
            notes.append(r.get("text", ""))
    n_verified = sum(1 for r in fio if r["phase"] in ("write", "prefill", "fg", "readback"))
    md.append("## Verification")
    md.append("")
    if not fatal and not failures:
        md.append(f"All {n_verified} verified fio write/read-back jobs and all checks passed "
                  f"(verify=crc32c, verify_fatal=1; read-back with verify_only through a fresh loop device).")
    for line in fatal:
        md.append(f"- **!!! FAILED (ebsfs/plain — fatal): {line}**")
    for line in failures:
        md.append(f"- **!!! FAILED (peer — reported, not fatal): {line}**")
    md.append("")
    summary["failures"] = {"fatal": fatal, "peer": failures}

    # ---- stacks
    def job_recs(stack, job, phase):
        return [r for r in fio if r["stack"] == stack and r["job"] == job and r["phase"] == phase]

    def job_rec(stack, job, phase):
        got = job_recs(stack, job, phase)
        return got[-1] if got else None

    def median_of(recs, field):
        """Median of `field` over the rounds; None if any round failed or lacks it."""
        vals = [r.get(field) for r in recs]
        if not recs or not all(r.get("ok") for r in recs) or any(v is None for v in vals):
            return None
        return statistics.median(vals)

    def value(stack, key, phase, metric):
        field = f"{phase if phase in ('read', 'write') else 'write'}_{metric}"
        return median_of(job_recs(stack, key, phase), field)

    stacks = [s for s in ("plain", "ebsfs-dio", "ebsfs-buf", "qcow2") if any(r["stack"] == s for r in fio)]
    if stacks:
        table = {}
        for s in stacks:
            table[s] = {}
            for key, _label, phase, metric, _u in JOBS:
                table[s][key] = value(s, key, phase, metric)
            qd1 = job_recs(s, "randreadqd1", "read")
            table[s]["p50"] = median_of(qd1, "read_p50_us")
            table[s]["p99"] = median_of(qd1, "read_p99_us")
        summary["stacks"] = table
        eb = [s for s in ("ebsfs-dio", "ebsfs-buf") if s in stacks]
        chosen = None
        if eb:
            scores = {s: geomean([table[s][k] for k, *_ in JOBS]) for s in eb}
            chosen = max(eb, key=lambda s: scores[s])
            if len(eb) == 2 and scores["ebsfs-buf"] > 0 and scores["ebsfs-dio"] > 0:
                other = [s for s in eb if s != chosen][0]
                notes.insert(0, f"ebsfs loop mode used for the ratios: **{STACK_LABELS[chosen]}** — geometric mean of the "
                                f"six job figures is {scores[chosen] / scores[other]:.2f}x that of {STACK_LABELS[other]}.")
            else:
                notes.insert(0, f"ebsfs loop mode used for the ratios: {STACK_LABELS[chosen]} (only mode run).")
        summary["ebsfs_loop_mode"] = chosen
        md.append("## Stacks: ext4 on a loop device, fio direct=1 libaio")
        md.append("")
        heads = [STACK_LABELS[s] for s in stacks]
        md.append("| job | " + " | ".join(heads) + " | ebsfs/plain | target | | ebsfs/qcow2 | target | |")
        md.append("|---|" + "---:|" * len(stacks) + "---:|---|---|---:|---|---|")
        ratios = {}
        for key, label, _phase, _metric, unit in JOBS:
            row = [f"{label} ({unit})"] + [fmt(table[s][key]) for s in stacks]
            e = table[chosen][key] if chosen else None
            p = table.get("plain", {}).get(key)
            q = table.get("qcow2", {}).get(key)
            rp = e / p if e and p else None
            rq = e / q if e and q else None
            ratios[key] = {"ebsfs/plain": rp, "ebsfs/qcow2": rq}
            tp = PLAIN_TARGETS.get(key)
            okp = (rp >= tp if rp is not None else False) if tp else None
            okq = rq >= QCOW_TARGET if rq is not None else (False if chosen else None)
            row += [fmt(rp, 2), f"≥ {tp}" if tp else "—", verdict(okp) if tp else "",
                    fmt(rq, 2), f"≥ {QCOW_TARGET:g}", verdict(okq)]
            md.append("| " + " | ".join(row) + " |")
            if tp:
                summary["targets"].append({"figure": f"ebsfs/plain {label}", "value": rp, "target": f">= {tp}", "pass": okp})
                if not okp:
                    misses.append(f"ebsfs/plain {label}: {fmt(rp, 2)} (target ≥ {tp}; ebsfs {fmt(e)} vs plain {fmt(p)} {unit})")
            summary["targets"].append({"figure": f"ebsfs/qcow2 {label}", "value": rq, "target": f">= {QCOW_TARGET}", "pass": okq})
            if okq is False:
                misses.append(f"ebsfs/qcow2 {label}: {fmt(rq, 2)} (target ≥ 3; ebsfs {fmt(e)} vs qcow2 {fmt(q)} {unit})")
        for pk, plabel in (("p50", "p50"), ("p99", "p99")):
            row = [f"  rand read 4 KiB QD1 {plabel} latency (µs)"] + [fmt(table[s][pk], 1) for s in stacks]
            e = table[chosen][pk] if chosen else None
            p = table.get("plain", {}).get(pk)
            if pk == "p50":
                diff = e - p if e is not None and p is not None else None
                ok = diff <= 30 if diff is not None else False
                row += [f"{'+' if diff is not None and diff >= 0 else ''}{fmt(diff, 1)} µs", "≤ plain + 30 µs", verdict(ok), "", "", ""]
                summary["targets"].append({"figure": "QD1 4 KiB read p50 - plain", "value": diff, "target": "<= 30 us", "pass": ok})
                ratios["p50_diff_us"] = diff
                if not ok:
                    misses.append(f"QD1 4 KiB read p50: ebsfs {fmt(e, 1)} µs vs plain {fmt(p, 1)} µs (+{fmt(diff, 1)} µs; target ≤ +30 µs)")
            else:
                row += ["", "", "", "", "", ""]
            md.append("| " + " | ".join(row) + " |")
        # verify row
        row = ["verification (inline + read-back)"]
        for s in stacks:
            bad_s = [f"{r['job']}/{r['phase']}" for r in fio if r["stack"] == s and not r.get("ok")]
            bad_s += [r.get("detail", "")[:60] for r in recs
                      if r["type"] == "failure" and r.get("what") == f"{s} stack"]
            n = sum(1 for r in fio if r["stack"] == s and r["phase"] in ("write", "prefill", "readback"))
            row.append("**FAILED: " + ", ".join(bad_s) + "**" if bad_s else f"ok ({n} jobs)")
        md.append("| " + " | ".join(row + [""] * 6) + " |")
        summary["ratios"] = ratios
        md.append("")
        loops = [r for r in recs if r["type"] == "loop"]
        if loops:
            md.append("Loop devices: " + "; ".join(
                f"{r['stack']} {r.get('purpose', '')}: requested dio={r['requested']}, actual dio={r['actual']}" for r in loops
                if r.get("purpose") == "bench") + ".")
            md.append("")

    # ---- snapshots
    snaps = [r for r in recs if r["type"] == "snapshot"]
    series = {r["label"]: r for r in recs if r["type"] == "mkdir_series"}
    srows = []

    def add(figure, val, target, ok, key=None, raw=None):
        srows.append((figure, val, target or "—", verdict(ok) if target else "info"))
        if key:
            summary["snapshots"][key] = raw
        if target:
            summary["targets"].append({"figure": figure, "value": raw, "target": target, "pass": ok})
            if ok is False:
                misses.append(f"{figure}: {val} (target {target})")

    small, big = series.get("mkdir-small"), series.get("mkdir-large")
    for s, key in ((small, "mkdir_small_ms"), (big, "mkdir_large_ms")):
        if s and s.get("latencies_ms"):
            lat = s["latencies_ms"]
            med = statistics.median(lat)
            add(f"mkdir latency, {fmt_bytes(s['volume_size'])} volume fully written (median of {len(lat)})",
                f"{med:.2f} ms (min {min(lat):.2f}, max {max(lat):.2f}, first {lat[0]:.2f})",
                "≤ 10 ms", med <= 10, key, med)
    if small and big and small.get("latencies_ms") and big.get("latencies_ms"):
        r = statistics.median(big["latencies_ms"]) / statistics.median(small["latencies_ms"])
        add(f"mkdir latency {fmt_bytes(big['volume_size'])} / {fmt_bytes(small['volume_size'])}",
            f"{r:.2f}", "≤ 1.5", r <= 1.5, "mkdir_ratio", r)
    cap = next((r for r in snaps if r.get("label") == "capture"), None)
    if cap and cap.get("capture_MBps"):
        add(f"capture throughput ({fmt_bytes(cap['changed_bytes'])} changed, random data, cold cache)",
            f"{cap['capture_MBps']:.0f} MB/s ({cap['capture_s']:.2f} s)", "≥ 300 MB/s",
            cap["capture_MBps"] >= 300, "capture_MBps", cap["capture_MBps"])
    first = next((r for r in snaps if r.get("label") == "first-capture"), None)
    if first and first.get("capture_MBps"):
        add("  first (full) capture of the same volume", f"{first['capture_MBps']:.0f} MB/s", None, None,
            "first_capture_MBps", first["capture_MBps"])
    busy = next((r for r in snaps if r.get("label") == "busy-capture"), None)
    if busy and busy.get("capture_MBps"):
        add("  capture under foreground random writes", f"{busy['capture_MBps']:.0f} MB/s ({busy['capture_s']:.2f} s)",
            None, None, "busy_capture_MBps", busy["capture_MBps"])
    io = {r["label"]: r for r in recs if r["type"] == "io"}
    for lab, title, target in (("aligned", "1% of blocks, aligned 64 KiB writes", "≤ 1.05"),
                               ("scattered", "1% of blocks, one scattered 4 KiB write each", None)):
        s = next((r for r in snaps if r.get("label") == lab), None)
        w = io.get(lab)
        if s and w and w.get("bytes"):
            ratio = s.get("stored_bytes", 0) / w["bytes"]
            title2 = title.replace("64 KiB", fmt_bytes(w.get("block_size")))
            add(f"stored / changed bytes, {title2}",
                f"{ratio:.3f} ({fmt_bytes(s.get('stored_bytes'))} stored / {fmt_bytes(w['bytes'])} written; "
                f"{s.get('changed_blocks')} blocks marked vs {w['blocks']} touched)",
                target, (ratio <= 1.05) if target else None, f"stored_per_changed_{lab}", ratio)
    fg_idle = job_rec("snap", "fgidle", "fg")
    fg_busy = job_rec("snap", "fgbusy", "fg")
    if fg_idle and fg_busy and fg_idle.get("ok") and fg_busy.get("ok") and fg_idle.get("write_iops"):
        r = fg_busy["write_iops"] / fg_idle["write_iops"]
        ov = next((x for x in recs if x["type"] == "overlap"), {})
        extra = ""
        if ov and busy and busy.get("end_epoch") and fg_busy.get("write_runtime_ms"):
            frac = (busy["end_epoch"] - float(ov["fio_start"])) / (fg_busy["write_runtime_ms"] / 1000.0)
            frac = max(0.0, min(1.0, frac))
            extra = f"; capture ran during {frac * 100:.0f}% of the job"
            summary["snapshots"]["fg_overlap"] = frac
            if frac < 0.9:
                notes.append(f"The capture ended after {frac * 100:.0f}% of the foreground job's write phase: "
                             "the during-capture figure is partly idle.")
        add("foreground rand write 4 KiB QD32 IOPS during capture / idle",
            f"{r:.2f} ({fg_busy['write_iops']:,.0f} / {fg_idle['write_iops']:,.0f} IOPS{extra})",
            "≥ 0.5", r >= 0.5, "fg_ratio", r)
    sr = job_rec("snap", "snapread", "read")
    lr = job_rec("snap", "liveread", "read")
    if sr and lr and sr.get("ok") and lr.get("ok") and lr.get("read_MBps"):
        r = sr["read_MBps"] / lr["read_MBps"]
        add("snapshot volume.img cold seq read 1 MiB / live volume (cold)",
            f"{r:.2f} ({sr['read_MBps']:.0f} / {lr['read_MBps']:.0f} MB/s)", "≥ 0.7", r >= 0.7, "image_read_ratio", r)
    for t in (r for r in recs if r["type"] == "timing"):
        add(t["what"], f"{t['seconds']} s", None, None)
    for c in (r for r in recs if r["type"] == "check" and r.get("group") not in ("clones", "bucket")):
        add(c["what"], "ok" if c.get("ok") else f"**FAILED** {c.get('detail', '')}", "must hold", bool(c.get("ok")))
    if srows:
        md.append("## Snapshots (raw ebsfs volume, no filesystem)")
        md.append("")
        md.append("| figure | value | target | |")
        md.append("|---|---|---|---|")
        for row in srows:
            md.append("| " + " | ".join(str(x) for x in row) + " |")
        md.append("")
        if meta.get("snap_sizes"):
            md.append(f"Sizes: {meta['snap_sizes']}.")
            md.append("")

    # ---- volumes from snapshots
    crows = []

    def cadd(figure, val, target, ok, key=None, raw=None):
        crows.append((figure, val, target or "—", verdict(ok) if target else "info"))
        if key:
            summary["clones"][key] = raw
        if target:
            summary["targets"].append({"figure": figure, "value": raw, "target": target, "pass": ok})
            if ok is False:
                misses.append(f"{figure}: {val} (target {target})")

    ctimes = {r["label"]: r for r in recs if r["type"] == "clone_time"}
    for method, mlabel in (("cp", "`cp snapshots/…/volume.img volumes/…`"),
                           ("create", "`ebsfs volume create … --from`")):
        small_c, large_c = ctimes.get(f"{method}-small"), ctimes.get(f"{method}-large")
        for c, which in ((small_c, "small"), (large_c, "large")):
            if not c:
                continue
            fb = c.get("fallback")
            title = f"{mlabel}, {fmt_bytes(c['snapshot_size'])} snapshot {c['snapshot']}"
            if fb:
                how = ("it did not finish in time" if fb.get("timed_out") else
                       f"the data directory grew by {fb['grown_at_stop'] / 2**20:,.0f} MiB within "
                       f"{fb['after_ms']:,.0f} ms: it copied bytes instead of sharing blocks")
                tail = ("" if fb.get("finished") else
                        f"; stopped, {fb['grown'] / 2**30:.1f} GiB written by then (the request in flight ran on)")
                done = len(c.get("times_ms") or [])
                cadd(title + (f" (after {done} copies by reference)" if done else ""),
                     f"**not a copy by reference**: {how}{tail}", "≤ 50 ms", False, f"{method}_{which}_ms", None)
                continue
            if c.get("times_ms"):
                t = c["times_ms"]
                med = statistics.median(t)
                extra = ""
                if c.get("cli_ms"):
                    extra = f"; the command's own timer: {statistics.median(c['cli_ms']):.1f} ms"
                cadd(f"{title} (median of {len(t)})",
                     f"{med:.1f} ms (min {min(t):.1f}, max {max(t):.1f}, first {t[0]:.1f}{extra})",
                     "≤ 50 ms", med <= 50, f"{method}_{which}_ms", med)
        if small_c and large_c and (small_c.get("fallback") or large_c.get("fallback")):
            cadd(f"  {method} time {fmt_bytes(large_c['snapshot_size'])} / {fmt_bytes(small_c['snapshot_size'])} snapshot",
                 "— (a copy was not by reference)", "≤ 1.5 (~1: constant time)", False, f"{method}_ratio", None)
        elif small_c and large_c and small_c.get("times_ms") and large_c.get("times_ms"):
            r = statistics.median(large_c["times_ms"]) / statistics.median(small_c["times_ms"])
            cadd(f"  {method} time {fmt_bytes(large_c['snapshot_size'])} / {fmt_bytes(small_c['snapshot_size'])} snapshot",
                 f"{r:.2f}", "≤ 1.5 (~1: constant time)", r <= 1.5, f"{method}_ratio", r)
    du = next((r for r in recs if r["type"] == "du" and r.get("what") == "clones"), None)
    if du and du.get("copies"):
        grown = int(du["after"]) - int(du["before"])
        copies = sum(len(c.get("names") or []) for c in ctimes.values()) or du["copies"]
        per = grown / copies
        fbs = [c["fallback"] for c in ctimes.values() if c.get("fallback")]
        fb_bytes = sum(f["grown"] for f in fbs)
        extra = (f"; {fb_bytes / 2**20:,.0f} MiB of it from the {len(fbs)} copies that copied bytes"
                 if fbs else "")
        cadd(f"data directory growth (`du`) after the {copies} copies",
             f"{grown / 1024:,.0f} KiB, {per / 1024:,.1f} KiB per copy{extra}",
             "≈ 0: ≤ 1 MiB per copy", per <= (1 << 20), "du_growth_per_copy", per)
        if fbs:
            shared = [g for c in ctimes.values() for g in (c.get("grown") or [])]
            if shared:
                cadd("  growth per copy by reference (measured around each copy)",
                     f"{statistics.median(shared) / 1024:,.1f} KiB (max {max(shared) / 1024:,.1f} KiB)", None, None,
                     "du_growth_per_shared_copy", statistics.median(shared))

    def cmed(job, field):
        return median_of(job_recs("clone", job, "read"), field)

    def cratio(title, num, den, qd, target, tmin, key):
        a_iops, b_iops = cmed(f"rr{qd}-{num}", "read_iops"), cmed(f"rr{qd}-{den}", "read_iops")
        if not a_iops or not b_iops:
            return
        r = a_iops / b_iops
        lat = ""
        if qd == 1:
            a50, b50 = cmed(f"rr1-{num}", "read_p50_us"), cmed(f"rr1-{den}", "read_p50_us")
            if a50 is not None and b50 is not None:
                lat = f"; p50 {a50:.0f} / {b50:.0f} µs"
        cadd(title, f"{r:.2f} ({a_iops:,.0f} / {b_iops:,.0f} IOPS{lat})", target, r >= tmin, key, r)

    cratio("unhydrated copy / snapshot image, rand read 4 KiB QD32 (hydrate = false)", "clone", "image", 32,
           "≥ 0.7", 0.7, "unhydrated_ratio_qd32")
    cratio("unhydrated copy / snapshot image, rand read 4 KiB QD1", "clone", "image", 1,
           "≥ 0.7", 0.7, "unhydrated_ratio_qd1")
    before = next((r for r in recs if r["type"] == "xattr" and r.get("what") == "hydrated-before"), None)
    if before and str(before.get("value")) not in ("0%", "0"):
        notes.append(f"The copy read with hydrate = false showed user.ebsfs.hydrated = {before.get('value')} "
                     "afterwards: part of it was read from its own data file.")
    hyd = next((r for r in recs if r["type"] == "hydrate" and r.get("label") != "bucket-hydrate"), None)
    if hyd and hyd.get("ok"):
        if hyd.get("hydrate_MBps"):
            val = (f"{hyd['hydrate_MBps']:.0f} MB/s ({fmt_bytes(hyd['size'])} in {hyd['hydrate_s']:.2f} s; "
                   f"100% {hyd['done_s']:.1f} s after the mount)")
        else:
            val = f"— (already {hyd.get('first_value')} at the mount)"
        cadd("background hydration throughput (cold cache, no other I/O)", val, None, None,
             "hydrate_MBps", hyd.get("hydrate_MBps"))
    cratio("hydrated copy / volume with the same data, rand read 4 KiB QD32", "hclone", "volume", 32,
           "≥ 0.9 (~1)", 0.9, "hydrated_ratio_qd32")
    cratio("hydrated copy / volume with the same data, rand read 4 KiB QD1", "hclone", "volume", 1,
           "≥ 0.9 (~1)", 0.9, "hydrated_ratio_qd1")
    for c in (r for r in recs if r["type"] == "check" and r.get("group") == "clones"):
        cadd(c["what"], "ok" if c.get("ok") else f"**FAILED** {c.get('detail', '')}", "must hold", bool(c.get("ok")))
    if crows:
        md.append("## Volumes from snapshots (copies by reference, raw volumes)")
        md.append("")
        md.append("| figure | value | target | |")
        md.append("|---|---|---|---|")
        for row in crows:
            md.append("| " + " | ".join(str(x) for x in row) + " |")
        md.append("")
        if meta.get("clone_sizes"):
            md.append(f"Sizes: {meta['clone_sizes']}.")
            md.append("")

    # ---- snapshots in a bucket
    brows = []

    def badd(figure, val, target, ok, key=None, raw=None):
        brows.append((figure, val, target or "—", verdict(ok) if target else "info"))
        if key:
            summary.setdefault("bucket", {})[key] = raw
        if target:
            summary["targets"].append({"figure": figure, "value": raw, "target": target, "pass": ok})
            if ok is False:
                misses.append(f"{figure}: {val} (target {target})")

    bcap = next((r for r in snaps if r.get("label") == "bucket-capture"), None)
    if bcap and bcap.get("capture_MBps"):
        badd(f"capture into the bucket ({fmt_bytes(bcap['changed_bytes'])} changed, random data, cold cache; "
             "mkdir to `completed`, which waits for the upload)",
             f"{bcap['capture_MBps']:.0f} MB/s ({bcap['capture_s']:.2f} s)", "≥ 200 MB/s",
             bcap["capture_MBps"] >= 200, "capture_MBps", bcap["capture_MBps"])
    sput = next((r for r in recs if r["type"] == "server_put" and r.get("seconds")), None)
    if sput:
        put_rate = sput["bytes"] / 1e6 / sput["seconds"]
        badd("  the server's own PUT rate: host A's packs again, in 32 MiB objects, 4 at once, by curl "
             "(nothing else running)", f"{put_rate:.0f} MB/s ({sput['requests']:,} PUTs)", None, None,
             "server_put_MBps", put_rate)
        if bcap and bcap.get("capture_MBps"):
            badd("  capture / the server's own PUT rate", f"{bcap['capture_MBps'] / put_rate:.2f}", None, None,
                 "capture_over_server_put", bcap["capture_MBps"] / put_rate)
    req = next((r for r in recs if r["type"] == "requests" and r.get("what") == "capture"), None)
    if req and bcap and bcap.get("changed_bytes"):
        gib = bcap["changed_bytes"] / 2**30
        per = req["put"] / gib
        badd("PUT requests per GiB captured (counted in the server's log, mkdir to `completed`)",
             f"{per:.1f} ({req['put']} PUT and {req['post']} POST for {gib:.2f} GiB; the bucket then held "
             f"{req['bucket_objects']} objects, {req['bucket_bytes'] / 2**20:,.0f} MiB)", None, None, "puts_per_gib", per)
    bhyd = next((r for r in recs if r["type"] == "hydrate" and r.get("label") == "bucket-hydrate"), None)
    if bhyd and bhyd.get("ok") and bhyd.get("hydrate_s"):
        mib_s = (bhyd.get("hydrate_MBps") or 0) * 1e6 / 2**20
        badd("background hydration of a copy from the bucket (host B, cold)",
             f"{mib_s:.0f} MiB/s ({fmt_bytes(bhyd['size'])} in {bhyd['hydrate_s']:.2f} s)", "≥ 300 MiB/s",
             mib_s >= 300, "hydrate_MiBps", mib_s)
    elif bhyd:
        badd("background hydration of a copy from the bucket (host B, cold)",
             f"— (still {bhyd.get('final_value')} after {bhyd.get('done_s', 0):.0f} s)", "≥ 300 MiB/s", False,
             "hydrate_MiBps", None)
    sget = next((r for r in recs if r["type"] == "server_get" and r.get("seconds")), None)
    if sget:
        ceiling = sget["bytes"] / 2**20 / sget["seconds"]
        badd("  the server's own GET rate: every pack in 4 MiB ranges, 16 at once, by curl (cold cache, "
             "nothing else running)", f"{ceiling:.0f} MiB/s ({sget['requests']:,} GETs)", None, None,
             "server_get_MiBps", ceiling)
        if bhyd and bhyd.get("ok") and bhyd.get("hydrate_MBps"):
            ratio = bhyd["hydrate_MBps"] * 1e6 / 2**20 / ceiling
            badd("  hydration / the server's own GET rate", f"{ratio:.2f}", None, None,
                 "hydrate_over_server_get", ratio)
    creq = {r.get("what"): r for r in recs if r["type"] == "requests"}
    cread = job_rec("bucket", "copyread", "read")
    if cread and cread.get("ok") and cread.get("read_MBps"):
        gets = creq.get("copyread", {}).get("get")
        badd("cold seq read 1 MiB QD8 of a new copy on host B, `hydrate = false` (every block from the bucket)",
             f"{cread['read_MBps'] * 1e6 / 2**20:.0f} MiB/s" + (f" ({gets:,} GETs)" if gets is not None else ""),
             None, None,
             "copy_read_MiBps", cread["read_MBps"] * 1e6 / 2**20)
    if bhyd and creq.get("hydrate", {}).get("get") is not None:
        badd("  GET requests during the background hydration", f"{creq['hydrate']['get']:,}", None, None,
             "hydrate_gets", creq["hydrate"]["get"])
    bd = [r for r in recs if r["type"] == "bucket_daemon" and "VmHWM" in r]
    if bd:
        a_rss = bd[0]["VmHWM"]
        limit = (256 << 20) + int(meta.get("cache_size", 128 << 20)) + int(meta.get("store_cache_size", 256 << 20))
        badd("host A's peak RSS (VmHWM) after the fill and the capture into the bucket",
             f"{a_rss / 2**20:.0f} MiB", f"≤ {limit / 2**20:.0f} MiB (cache_size + store cache_size + 256 MiB)",
             a_rss <= limit, "capture_peak_rss", a_rss)
        if len(bd) > 1:
            badd("host B's peak RSS after the hydration", f"{bd[1]['VmHWM'] / 2**20:.0f} MiB", None, None,
                 "hydrate_peak_rss", bd[1]["VmHWM"])
    for c in (r for r in recs if r["type"] == "check" and r.get("group") == "bucket"):
        badd(c["what"], "ok" if c.get("ok") else f"**FAILED** {c.get('detail', '')}", "must hold", bool(c.get("ok")))
    if brows:
        md.append(f"## Snapshots in a bucket ({meta.get('s3_server', 's3s-fs')} on loopback)")
        md.append("")
        md.append("| figure | value | target | |")
        md.append("|---|---|---|---|")
        for row in brows:
            md.append("| " + " | ".join(str(x) for x in row) + " |")
        md.append("")
        if meta.get("bucket_sizes"):
            md.append(f"Sizes: {meta['bucket_sizes']}; server {meta.get('s3s_fs', 's3s-fs')}.")
            md.append("")

    # ---- daemon
    d = [r for r in recs if r["type"] == "daemon" and "VmHWM" in r]
    if d:
        last = d[-1]
        hwm = max(r["VmHWM"] for r in d)
        # The clone figures restart the daemon: CPU time is summed over the processes.
        per_pid = {}
        for r in d:
            per_pid[r["pid"]] = r
        cpu = sum(r["cpu_s"] for r in per_pid.values())
        moved = sum(r.get("read_bytes", 0) + r.get("write_bytes", 0) for r in fio if r.get("target") == "ebsfs")
        moved += sum(r.get("bytes", 0) for r in recs if r["type"] == "io" and r.get("target") == "ebsfs")
        # With a bucket (--only bucket) the store's cache is configured memory too.
        limit = (256 << 20) + int(meta.get("cache_size", 128 << 20)) + int(meta.get("store_cache_size", 0))
        md.append("## ebsfs daemon")
        md.append("")
        md.append("| figure | value | target | |")
        md.append("|---|---|---|---|")
        ok = hwm <= limit
        md.append(f"| peak RSS (VmHWM) over the whole run | {hwm / 2**20:.1f} MiB | ≤ {limit / 2**20:.0f} MiB "
                  f"(256 MiB + caches) | {verdict(ok)} |")
        summary["targets"].append({"figure": "peak RSS", "value": hwm, "target": f"<= {limit}", "pass": ok})
        if not ok:
            misses.append(f"peak RSS: {hwm / 2**20:.1f} MiB (target ≤ {limit / 2**20:.0f} MiB)")
        gib = moved / 2**30
        per = cpu / gib if gib else None
        md.append(f"| CPU seconds (utime+stime) per GiB moved through the mount | {fmt(per, 2)} s/GiB "
                  f"({cpu:.1f} s for {gib:.1f} GiB) | — | info |")
        rw = sum(r.get("io_rchar", 0) + r.get("io_wchar", 0) for r in per_pid.values()) / 2 / 2**30
        md.append(f"| daemon syscall I/O (rchar+wchar)/2, incl. capture work | {rw:.1f} GiB | — | info |")
        if len(per_pid) > 1:
            notes.append(f"The daemon ran as {len(per_pid)} processes (the clone figures remount it with "
                         "hydrate off, then on): CPU and I/O are summed over them, peak RSS is the highest.")
        md.append("")
        if len(d) > 1:
            md.append("Peak RSS so far: " + "; ".join(f"{r['label']}: {r['VmHWM'] / 2**20:.0f} MiB" for r in d) + ".")
            md.append("")
        summary["daemon"] = {"peak_rss": hwm, "cpu_s": cpu, "moved_bytes": moved, "cpu_s_per_gib": per}

    if notes:
        md.append("## Notes")
        md.append("")
        for n in notes:
            md.append(f"- {n}")
        md.append("")
    md.append("## Targets missed")
    md.append("")
    if misses:
        for m in misses:
            md.append(f"- {m}")
    else:
        md.append("None." if not a.incomplete else "None among the figures measured.")
    md.append("")
    summary["misses"] = misses
    summary["records"] = recs

    text = "\n".join(md)
    with open(a.out_md, "w") as f:
        f.write(text)
    with open(a.out_json, "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True, default=str)
    print(text)
    return 1 if fatal else 0


def fmt_bytes(n):
    if n is None or n == "?":
        return "?"
    n = int(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % (size // 16 or 1) == 0:
            v = n / size
            return f"{v:g} {unit}"
    return f"{n} B"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("fio-record")
    s.add_argument("--json", required=True)
    s.add_argument("--stderr", required=True)
    s.add_argument("--rc", type=int, required=True)
    s.add_argument("--stack", required=True)
    s.add_argument("--job", required=True)
    s.add_argument("--phase", required=True)
    s.add_argument("--target", default="none")
    s.add_argument("--desc", default="")
    s.set_defaults(fn=cmd_fio_record)

    for name, fn in (("snap-mkdir", cmd_snap_mkdir), ("snap-wait", cmd_snap_wait)):
        s = sub.add_parser(name)
        s.add_argument("--mnt", required=True)
        s.add_argument("--name", required=True)
        s.add_argument("--label", default="")
        s.add_argument("--timeout", type=float, default=3600)
        s.add_argument("--block-size", type=int, default=65536)
        if name == "snap-mkdir":
            s.add_argument("--wait", action="store_true")
        else:
            s.add_argument("--t0-ns", type=int, required=True)
            s.add_argument("--mkdir-ms", type=float, default=None)
        s.set_defaults(fn=fn)

    s = sub.add_parser("snap-status")
    s.add_argument("--mnt", required=True)
    s.add_argument("--name", required=True)
    s.set_defaults(fn=cmd_snap_status)

    s = sub.add_parser("write-blocks")
    s.add_argument("--file", required=True)
    s.add_argument("--block-size", type=int, required=True)
    s.add_argument("--fraction", type=float, default=0.01)
    s.add_argument("--count", type=int, default=None)
    s.add_argument("--mode", choices=("aligned", "scattered"), required=True)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--label", required=True)
    s.set_defaults(fn=cmd_write_blocks)

    s = sub.add_parser("mkdir-series")
    s.add_argument("--mnt", required=True)
    s.add_argument("--volume", required=True)
    s.add_argument("--count", type=int, default=5)
    s.add_argument("--between", type=int, default=256)
    s.add_argument("--prefix", default="m")
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--timeout", type=float, default=3600)
    s.add_argument("--label", required=True)
    s.set_defaults(fn=cmd_mkdir_series)

    s = sub.add_parser("config")
    s.add_argument("--file")
    s.set_defaults(fn=cmd_config)

    s = sub.add_parser("config-set")
    s.add_argument("--file", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("pairs", nargs="+")
    s.set_defaults(fn=cmd_config_set)

    s = sub.add_parser("clone-time")
    s.add_argument("--mnt", required=True)
    s.add_argument("--snapshot", required=True)
    s.add_argument("--method", choices=("cp", "create"), required=True)
    s.add_argument("--bin", default="ebsfs")
    s.add_argument("--count", type=int, default=5)
    s.add_argument("--prefix", required=True)
    s.add_argument("--label", required=True)
    s.add_argument("--data-dir", required=True)
    s.add_argument("--max-growth", type=int, default=64 << 20)
    s.add_argument("--max-seconds", type=float, default=120)
    s.set_defaults(fn=cmd_clone_time)

    s = sub.add_parser("hydrate-wait")
    s.add_argument("--file", required=True)
    s.add_argument("--timeout", type=float, default=3600)
    s.add_argument("--poll", type=float, default=0.02)
    s.add_argument("--label", default="hydrate")
    s.set_defaults(fn=cmd_hydrate_wait)

    s = sub.add_parser("xattr")
    s.add_argument("--file", required=True)
    s.add_argument("--name", required=True)
    s.set_defaults(fn=cmd_xattr)

    s = sub.add_parser("size")
    s.add_argument("value")
    s.set_defaults(fn=cmd_size)

    s = sub.add_parser("daemon-stats")
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--label", default="")
    s.set_defaults(fn=cmd_daemon_stats)

    s = sub.add_parser("kv")
    s.add_argument("type")
    s.add_argument("pairs", nargs="*")
    s.set_defaults(fn=cmd_kv)

    s = sub.add_parser("report")
    s.add_argument("--records", required=True)
    s.add_argument("--out-md", required=True)
    s.add_argument("--out-json", required=True)
    s.add_argument("--incomplete", default="")
    s.set_defaults(fn=cmd_report)

    a = p.parse_args()
    rc = a.fn(a)
    sys.exit(rc or 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Changed-blocks benchmark: how long listing what a snapshot changed takes, for 1% of
# the blocks of a large volume changed since its parent (target: < 100 ms at 32 GiB).
#
#   sudo bench/diff.sh [--size-gib N] [--no-build]
#
# A volume of N GiB (default 32) gets 4 GiB of data and snapshot d@base; then 1% of
# its blocks, scattered, are rewritten (fio randwrite, whole blocks) and d@next taken.
# Printed: the time to read snapshots/d@next/changed, to run `ebsfs snapshot diff
# d@base d@next`, each the median of 5, against the target; and a check that the
# listed ranges cover exactly the rewritten bytes. Exit status 0 = ran, 1 = the
# listing was wrong, 2 = setup error. Everything is removed on exit.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
SIZE_GIB=32
BUILD=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --size-gib) SIZE_GIB=${2:?--size-gib needs a number}; shift ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "diff.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[[ $(id -u) -eq 0 ]] || { echo "diff.sh: run as root (FUSE mount)" >&2; exit 2; }
command -v fio >/dev/null || { echo "diff.sh: needs fio" >&2; exit 2; }
if [[ $BUILD -eq 1 ]]; then (cd "$REPO" && cargo build --release --quiet); fi
BIN=${EBSFS_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/ebsfs}
[[ -x $BIN ]] || { echo "diff.sh: no binary at $BIN (set EBSFS_BIN)" >&2; exit 2; }

WORK=$(mktemp -d "$BENCH_DIR/.work.diff.XXXXXX")
MNT=$WORK/mnt
PID=""
cleanup() {
  if [[ -n $PID ]]; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  findmnt -rn -M "$MNT" >/dev/null 2>&1 && umount -l "$MNT"
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$MNT" "$WORK/data"
setsid "$BIN" mount "$MNT" --data-dir "$WORK/data" --config "$REPO/config.toml" \
  </dev/null >"$WORK/ebsfs.log" 2>&1 &
PID=$!
for _ in $(seq 300); do [[ -d $MNT/volumes ]] && break; sleep 0.1; done
[[ -d $MNT/volumes ]] || { tail "$WORK/ebsfs.log" >&2; exit 2; }

VOL=$MNT/volumes/d.img
truncate -s "${SIZE_GIB}G" "$VOL"
BLOCK=$(python3 -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb")).get("block_size","64KiB"))' "$REPO/config.toml")
BLOCK=$(numfmt --from=iec-i "${BLOCK%B}")
BLOCKS=$((SIZE_GIB * 1024 * 1024 * 1024 / BLOCK))
CHANGED=$((BLOCKS / 100))
echo "volume ${SIZE_GIB} GiB, block $BLOCK B: writing 4 GiB, then $CHANGED of $BLOCKS blocks (1%)"
fio --name=base --filename="$VOL" --rw=write --bs=1M --size=4g --direct=1 \
  --ioengine=libaio --iodepth=8 --output=/dev/null
mkdir "$MNT/snapshots/d@base"
until grep -qx completed "$MNT/snapshots/d@base/status"; do sleep 0.2; done
fio --name=change --filename="$VOL" --rw=randwrite --bs="$BLOCK" --size="${SIZE_GIB}g" \
  --io_size=$((CHANGED * BLOCK)) --randrepeat=0 --direct=1 \
  --ioengine=libaio --iodepth=16 --write_iolog="$WORK/iolog" --output=/dev/null
mkdir "$MNT/snapshots/d@next"
until grep -qx completed "$MNT/snapshots/d@next/status"; do sleep 0.2; done

python3 - "$MNT" "$BIN" "$WORK/iolog" "$BLOCK" <<'PY'
import statistics, subprocess, sys, time
mnt, binary, iolog, block = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def timed(f):
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        out = f()
        runs.append((time.perf_counter() - t) * 1000)
    return statistics.median(runs), out

ms_file, text = timed(lambda: open(f"{mnt}/snapshots/d@next/changed").read())
ms_cli, out = timed(lambda: subprocess.run(
    [binary, "snapshot", "diff", "d@base", "d@next", "--mount", mnt],
    check=True, capture_output=True, text=True).stdout)
listed = set()
for line in text.splitlines():
    off, length = map(int, line.split())
    listed.update(range(off // block, (off + length) // block))
written = set()
for line in open(iolog):
    # fio's iolog: [TIME] FILE write OFFSET LENGTH (version 2 has no time, 3 does).
    parts = line.split()
    if "write" in parts[1:3]:
        at = parts.index("write")
        written.add(int(parts[at + 1]) // block)
ok = listed == written and out == text
print(f"changed blocks written {len(written)}, listed {len(listed)}: {'exact' if ok else 'WRONG'}")
print(f"read snapshots/d@next/changed   {ms_file:8.1f} ms   target < 100 ms  ratio {100 / ms_file:5.1f}x")
print(f"ebsfs snapshot diff (CLI)       {ms_cli:8.1f} ms   target < 100 ms  ratio {100 / ms_cli:5.1f}x")
sys.exit(0 if ok else 1)
PY

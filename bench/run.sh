#!/usr/bin/env bash
# ebsfs benchmark harness: ebsfs against a plain loop file and a qcow2 FUSE export,
# plus snapshot figures and volumes made from snapshots, in one run. See bench/README.md.
#
#   sudo bench/run.sh [--quick | --smoke] [--dir DIR] [--config FILE] [--no-build]
#                     [--only stacks|snapshots|clones|bucket] [--s3-server s3s-fs|garage]
#                     [--qcow2-loop-dio on|off] [--rounds N]
#
# Writes bench/results/<date>-<mode>.md and .json and prints the table. Exit status:
# 0 = ran (targets may be missed), 1 = verification failure / ebsfs failure / plain
# failure, 2 = setup or usage error, 130/143 = interrupted. Everything it sets up
# (mounts, loop devices, daemons, temp data) is torn down on exit, also on Ctrl-C.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
HELPER="$BENCH_DIR/helper.py"
# Debian's interpreter starts much faster than a pyenv shim; any python3 >= 3.11 works.
PY=python3
[[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import tomllib' 2>/dev/null && PY=/usr/bin/python3

MODE=full
BASE_DIR=""
CONFIG="$REPO/config.toml"
BUILD=1
ONLY=all
QCOW2_LOOP_DIO=off
ROUNDS=""
S3_SERVER=s3s-fs

usage() {
  sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Modes:  (default) full run: 2 GiB fio files, 1 + 32 GiB mkdir and clone volumes, 4 GiB capture (~25-50 min, ~67 GiB free disk)
        --quick   smaller files and runtimes (a few minutes)
        --smoke   tiny sizes (< 2 minutes): checks that the harness works
Options:
  --dir DIR              put the work directory (all data) under DIR instead of bench/
  --config FILE          ebsfs config to mount with (default: config.toml of the repo)
  --no-build             do not run cargo build --release first
  --only stacks|snapshots|clones|bucket  run one group only (bucket: snapshots in an
                         S3-compatible bucket served by s3s-fs on loopback; never part of a
                         full run; S3S_FS_BIN names the server, else s3s-fs on PATH, else
                         it is installed with cargo under bench/.tools)
  --s3-server s3s-fs|garage  the server of --only bucket (default s3s-fs); garage: a
                         single Garage node (replication factor 1) on loopback, from
                         GARAGE_BIN, else garage on PATH, else ../shared/tools/garage
  --qcow2-loop-dio on|off  loop mode on the qemu FUSE export (default off: dio on corrupts ext4)
  --rounds N             run every stack N times, interleaved, and report medians
                         and the clone read jobs N times (default 3 in full mode, 1 otherwise)
EOF
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) MODE=quick ;;
    --smoke) MODE=smoke ;;
    --full) MODE=full ;;
    --dir) BASE_DIR=${2:?--dir needs a directory}; shift ;;
    --config) CONFIG=${2:?--config needs a file}; shift ;;
    --no-build) BUILD=0 ;;
    --only) ONLY=${2:?--only needs stacks, snapshots, clones or bucket}; shift ;;
    --qcow2-loop-dio) QCOW2_LOOP_DIO=${2:?}; shift ;;
    --rounds) ROUNDS=${2:?--rounds needs a number}; shift ;;
    --s3-server) S3_SERVER=${2:?--s3-server needs s3s-fs or garage}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case $ONLY in all|stacks|snapshots|clones|bucket) ;; *) echo "run.sh: --only takes stacks, snapshots, clones or bucket" >&2; exit 2 ;; esac
case $S3_SERVER in s3s-fs|garage) ;; *) echo "run.sh: --s3-server takes s3s-fs or garage" >&2; exit 2 ;; esac
case $QCOW2_LOOP_DIO in on|off) ;; *) echo "run.sh: --qcow2-loop-dio takes on or off" >&2; exit 2 ;; esac
[[ -z $ROUNDS || $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --rounds takes a positive number" >&2; exit 2; }

log() { printf '%s [bench] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; ABORT_REASON=${ABORT_REASON:-$*}; exit 2; }

# ------------------------------------------------------------------ sizes per mode
KiB=1024; MiB=$((1024 * KiB)); GiB=$((1024 * MiB))
case $MODE in
  full)
    FILE=$((2 * GiB)); RW_IO=$((1 * GiB)); RR_IO=$((1 * GiB)); R1_IO=$((128 * MiB))
    FS_FILE=$((256 * MiB)); FS_IO=$((32 * MiB)); RAND_CAP=60; FIO_TIMEOUT=3600
    CAP=$((4 * GiB)); V_SMALL=$((1 * GiB)); V_LARGE=$((32 * GiB)); MKDIR_N=5; SNAP_TIMEOUT=3600
    EBSFS_LOOP_MODES="on off"; ROUNDS=${ROUNDS:-3} ;;
  quick)
    FILE=$((512 * MiB)); RW_IO=$((256 * MiB)); RR_IO=$((256 * MiB)); R1_IO=$((32 * MiB))
    FS_FILE=$((64 * MiB)); FS_IO=$((8 * MiB)); RAND_CAP=15; FIO_TIMEOUT=900
    CAP=$((1 * GiB)); V_SMALL=$((256 * MiB)); V_LARGE=$((4 * GiB)); MKDIR_N=5; SNAP_TIMEOUT=900
    EBSFS_LOOP_MODES="on" ;;
  smoke)
    FILE=$((32 * MiB)); RW_IO=$((8 * MiB)); RR_IO=$((8 * MiB)); R1_IO=$((2 * MiB))
    FS_FILE=$((16 * MiB)); FS_IO=$((512 * KiB)); RAND_CAP=5; FIO_TIMEOUT=300
    CAP=$((128 * MiB)); V_SMALL=$((16 * MiB)); V_LARGE=$((256 * MiB)); MKDIR_N=5; SNAP_TIMEOUT=300
    EBSFS_LOOP_MODES="on" ;;
esac
ROUNDS=${ROUNDS:-1}
# Volumes from snapshots: copies timed per snapshot size and method; the clone read
# jobs read each block of the 1 GiB (quick 256 MiB, smoke 16 MiB) source at most once.
CLONE_N=5
CL_RR_IO=$(( RR_IO < V_SMALL ? RR_IO : V_SMALL ))
CLONE_SPILL=$(( 2 * (V_LARGE < 4 * GiB ? V_LARGE : 4 * GiB) ))
# ext4 image holding the three fio files, with room for metadata.
IMG_SIZE=$(( (2 * FILE + FS_FILE) * 23 / 20 + 128 * MiB ))
IMG_SIZE=$(( (IMG_SIZE + MiB - 1) / MiB * MiB ))

# -------------------------------------------------------------- state and cleanup
WORK=""
RECORDS=""
CHILD=""
EBSFS_PID=""
EBSFS_MNT=""
QSD_PID=""
QSD_EXPORT=""
ABORT_REASON=""
REPORT_DONE=0
FATAL=0
declare -a CLEAN_MOUNTS=()
declare -a CLEAN_LOOPS=()
declare -a BG_PIDS=()

proc_alive() {  # true if the pid exists and is not a zombie
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

is_mounted() { findmnt -rn -M "$1" >/dev/null 2>&1; }

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

stop_qsd() {
  [[ -n $QSD_PID ]] || return 0
  kill -TERM "$QSD_PID" 2>/dev/null || true
  local i
  for ((i = 0; i < 300; i++)); do proc_alive "$QSD_PID" || break; sleep 0.1; done
  if proc_alive "$QSD_PID"; then
    log "qemu-storage-daemon did not stop within 30 s: killing it"
    kill -KILL "$QSD_PID" 2>/dev/null || true
  fi
  wait "$QSD_PID" 2>/dev/null || true
  [[ -n $QSD_EXPORT ]] && is_mounted "$QSD_EXPORT" && umount -l "$QSD_EXPORT" 2>/dev/null
  QSD_PID=""
  return 0
}

# Stops the ebsfs daemon with SIGTERM (a clean unmount) and records how it ended.
stop_ebsfs() {
  [[ -n $EBSFS_PID ]] || return 0
  local pid=$EBSFS_PID i rc=0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 1800; i++)); do proc_alive "$pid" || break; sleep 0.1; done
  if proc_alive "$pid"; then
    log "!!! ebsfs did not exit within 180 s of SIGTERM: killing it (see the log)"
    record failure what="ebsfs daemon" detail="did not exit within 180 s of SIGTERM (hang); killed" fatal=1
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || rc=$?
  EBSFS_PID=""
  if [[ $rc -ne 0 && -z $ABORT_REASON ]]; then
    log "!!! ebsfs exited with status $rc after SIGTERM"
    record failure what="ebsfs daemon" detail="exited with status $rc after SIGTERM" fatal=1
  fi
  if is_mounted "$EBSFS_MNT"; then
    [[ -z $ABORT_REASON ]] && record failure what="ebsfs daemon" detail="mount left behind after a clean stop" fatal=1
    umount -l "$EBSFS_MNT" 2>/dev/null || true
  fi
  return 0
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [[ -n $CHILD ]] && proc_alive "$CHILD"; then
    kill -TERM "$CHILD" 2>/dev/null
    for _ in $(seq 50); do proc_alive "$CHILD" || break; sleep 0.1; done
    kill -KILL "$CHILD" 2>/dev/null
    wait "$CHILD" 2>/dev/null
  fi
  for m in "${BG_PIDS[@]}"; do kill -TERM "$m" 2>/dev/null; done
  [[ -z $WORK ]] && exit "$rc"
  log "cleaning up"
  local i m l
  for ((i = ${#CLEAN_MOUNTS[@]} - 1; i >= 0; i--)); do
    m=${CLEAN_MOUNTS[i]}
    if is_mounted "$m"; then umount "$m" 2>/dev/null || umount -l "$m"; fi
  done
  for l in "${CLEAN_LOOPS[@]}"; do
    [[ -e /sys/block/${l#/dev/}/loop/backing_file ]] && losetup -d "$l" 2>/dev/null
  done
  stop_qsd
  if [[ -n $EBSFS_PID ]]; then
    [[ $REPORT_DONE -eq 0 && -n $RECORDS && -s $RECORDS ]] && "$PY" "$HELPER" daemon-stats --pid "$EBSFS_PID" --label final >>"$RECORDS" 2>/dev/null
    stop_ebsfs
  fi
  if [[ -n $EBSFS_MNT ]] && is_mounted "$EBSFS_MNT"; then umount -l "$EBSFS_MNT"; fi
  if [[ $REPORT_DONE -eq 0 && -n $RECORDS && -s $RECORDS ]]; then
    log "writing a partial report"
    make_report "${ABORT_REASON:-stopped with status $rc}" >/dev/null
  fi
  if [[ -n $RECORDS && -f $WORK/ebsfs.log && -n ${RESULT_BASE:-} ]]; then
    cp "$WORK/ebsfs.log" "$RESULT_BASE.ebsfs.log" 2>/dev/null
  fi
  if findmnt -rn -o TARGET | grep -qF "$WORK"; then
    log "!!! something is still mounted under $WORK: not deleting it"
    findmnt -rn -o TARGET | grep -F "$WORK" >&2
  else
    rm -rf --one-file-system "$WORK"
  fi
  exit "$rc"
}
on_signal() { ABORT_REASON="interrupted by SIG$1"; log "interrupted (SIG$1)"; exit "$2"; }

# Runs a command in the background and waits for it, so that a signal is handled at once.
run_child() {
  "$@" &
  CHILD=$!
  local rc=0
  wait "$CHILD" || rc=$?
  CHILD=""
  return "$rc"
}

record() {  # record TYPE key=value...
  "$PY" "$HELPER" kv "$@" >>"$RECORDS"
}

check_daemons() {
  if [[ -n $EBSFS_PID && -z $ABORT_REASON ]] && ! proc_alive "$EBSFS_PID"; then
    local rc=0
    wait "$EBSFS_PID" || rc=$?
    EBSFS_PID=""
    log "!!! the ebsfs daemon died (exit status $rc). Last log lines:"
    tail -n 20 "$WORK/ebsfs.log" >&2 || true
    record failure what="ebsfs daemon" detail="died during the run (exit status $rc); see $RESULT_BASE.ebsfs.log" fatal=1
    ABORT_REASON="the ebsfs daemon died"
    FATAL=1
    exit 1
  fi
}

# ------------------------------------------------------------------ prerequisites
[[ $EUID -eq 0 ]] || { echo "run.sh: must run as root (loop devices, mounts, drop_caches)" >&2; exit 2; }

need_pkgs=()
command -v fio >/dev/null || need_pkgs+=(fio)
command -v qemu-img >/dev/null || need_pkgs+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null || need_pkgs+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
command -v losetup >/dev/null || need_pkgs+=(util-linux)
command -v fusermount3 >/dev/null || need_pkgs+=(fuse3)
command -v python3 >/dev/null || need_pkgs+=(python3)
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
  log "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq "${need_pkgs[@]}" >/dev/null; } \
    || { echo "run.sh: cannot install ${need_pkgs[*]}" >&2; exit 2; }
fi
"$PY" -c 'import sys, tomllib; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || { echo "run.sh: needs Python >= 3.11 (tomllib)" >&2; exit 2; }
modprobe loop 2>/dev/null || true
modprobe fuse 2>/dev/null || true
[[ -e /dev/fuse ]] || { echo "run.sh: /dev/fuse is missing" >&2; exit 2; }
[[ -f $CONFIG ]] || { echo "run.sh: config $CONFIG not found" >&2; exit 2; }
CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")

if [[ $BUILD -eq 1 ]]; then
  log "building ebsfs (cargo build --release)"
  (cd "$REPO" && cargo build --release --quiet) || { echo "run.sh: cargo build --release failed" >&2; exit 2; }
fi
TARGET_DIR=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
  | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null) \
  || TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BIN="$TARGET_DIR/release/ebsfs"
[[ -x $BIN ]] || { echo "run.sh: $BIN not found: build with cargo build --release" >&2; exit 2; }

S3S=""
S3S_SECRET=""
GARAGE=""
if [[ $ONLY == bucket && $S3_SERVER == garage ]]; then
  GARAGE=${GARAGE_BIN:-$(command -v garage || true)}
  [[ -n $GARAGE ]] || GARAGE="$REPO/../shared/tools/garage"
  [[ -x $GARAGE ]] || { echo "run.sh: no garage binary: set GARAGE_BIN or put garage on PATH" >&2; exit 2; }
  S3S_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
elif [[ $ONLY == bucket ]]; then
  S3S=${S3S_FS_BIN:-$(command -v s3s-fs || true)}
  if [[ -z $S3S ]]; then
    S3S="$BENCH_DIR/.tools/bin/s3s-fs"
    if [[ ! -x $S3S ]]; then
      log "installing s3s-fs 0.14.1 into bench/.tools (cargo install, about 5 min)"
      cargo install --quiet --locked s3s-fs@0.14.1 --features binary --root "$BENCH_DIR/.tools" \
        || { echo "run.sh: cannot install s3s-fs (set S3S_FS_BIN)" >&2; exit 2; }
    fi
  fi
  [[ -x $S3S ]] || { echo "run.sh: s3s-fs $S3S is not executable" >&2; exit 2; }
  S3S_SECRET=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
fi

# ------------------------------------------------------------------ work directory
if [[ -n $BASE_DIR ]]; then
  mkdir -p "$BASE_DIR"
  WORK_PARENT=$(cd "$BASE_DIR" && pwd)
else
  WORK_PARENT="$BENCH_DIR"
fi
avail=$(df -B1 --output=avail "$WORK_PARENT" | tail -n 1 | tr -d ' ')
case $ONLY in
  stacks) need=$(( IMG_SIZE * 9 / 10 + 2 * GiB )) ;;
  # Snapshot volumes stay until the end: large (live data + ~5% compressed chunks),
  # small (+ snapshots), capture volume (live + three full snapshots).
  snapshots) need=$(( V_LARGE * 106 / 100 + 2 * V_SMALL + 42 * CAP / 10 + 2 * GiB )) ;;
  # Clone source (live + chunks), the hydrated clone, and the large source: its own
  # (live data only: its blocks repeat the small source's) unless the snapshots ran.
  # CLONE_SPILL: what two copies that fall back to copying bytes may write before
  # they are stopped (the request in flight, up to 4 GiB, runs on).
  clones) need=$(( V_LARGE * 102 / 100 + 4 * V_SMALL + CLONE_SPILL + 2 * GiB )) ;;
  # The volume, its chunks, the bucket's copy, the hydrated copy on the second host,
  # and the server's own PUT figure (a split copy of the packs, and its objects,
  # deleted after, which Garage frees late).
  bucket) need=$(( 6 * CAP + 2 * GiB )) ;;
  *) need=$(( V_LARGE * 106 / 100 + 6 * V_SMALL + 42 * CAP / 10 + CLONE_SPILL + 2 * GiB )) ;;
esac
if [[ $avail -lt $need ]]; then
  echo "run.sh: $MODE mode needs about $((need / GiB + 1)) GiB free under $WORK_PARENT, only $((avail / GiB)) GiB available." >&2
  echo "        Free some space, use --dir on a larger filesystem, or use --quick / --smoke." >&2
  exit 2
fi

trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

[[ $WORK_PARENT != *[[:space:]]* ]] || { echo "run.sh: the work directory path must not contain spaces" >&2; exit 2; }
WORK=$(mktemp -d "$WORK_PARENT/.work.XXXXXX")
RECORDS="$WORK/records.jsonl"
mkdir -p "$WORK/fio" "$WORK/state" "$BENCH_DIR/results"
STAMP=$(date +%Y-%m-%d-%H%M%S)
RESULT_BASE="$BENCH_DIR/results/$STAMP-$MODE"
: >"$RECORDS"

eval "$("$PY" "$HELPER" config --file "$CONFIG")"
cp "$CONFIG" "$WORK/ebsfs.toml"

commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || commit="$commit+dirty"
record meta mode="$MODE" date="$(date '+%Y-%m-%d %H:%M:%S %Z')" commit="$commit" \
  host="$(hostname)" kernel="$(uname -r)" cpus="$(nproc)" \
  mem="$(free -g | awk '/^Mem:/{print $2}') GiB" fio="$(fio --version)" \
  workdir="$WORK" workfs="$(findmnt -rn -o SOURCE,FSTYPE -T "$WORK" | head -n 1)" \
  config="$CONFIG" block_size="$CFG_BLOCK_SIZE" cache_size="$CFG_CACHE_SIZE" rounds="$ROUNDS" \
  file_size="$FILE" rw_io="$RW_IO" rr_io="$RR_IO" r1_io="$R1_IO" fs_file="$FS_FILE" fs_io="$FS_IO" \
  rand_cap="$RAND_CAP" img_size="$IMG_SIZE" qcow2_loop_dio="$QCOW2_LOOP_DIO" binary="$BIN"
log "$MODE run; work dir $WORK; results $RESULT_BASE.md"

# ------------------------------------------------------------------------ ebsfs
start_ebsfs() {
  EBSFS_MNT="$WORK/ebsfs-mnt"
  mkdir -p "$WORK/ebsfs-data" "$EBSFS_MNT"
  log "starting ebsfs: $BIN mount $EBSFS_MNT --data-dir $WORK/ebsfs-data"
  # setsid: a Ctrl-C in the terminal reaches this script only; the cleanup stops ebsfs.
  RUST_LOG=${RUST_LOG:-info} setsid "$BIN" mount "$EBSFS_MNT" --data-dir "$WORK/ebsfs-data" \
    --config "$WORK/ebsfs.toml" </dev/null >>"$WORK/ebsfs.log" 2>&1 &
  EBSFS_PID=$!
  local i
  for ((i = 0; i < 300; i++)); do
    if is_mounted "$EBSFS_MNT" && [[ -d $EBSFS_MNT/volumes ]]; then return 0; fi
    check_daemons
    sleep 0.1
  done
  tail -n 20 "$WORK/ebsfs.log" >&2
  die "ebsfs did not mount within 30 s"
}

start_qsd() {  # start_qsd QCOW2 EXPORT
  QSD_EXPORT=$2
  touch "$QSD_EXPORT"
  setsid qemu-storage-daemon \
    --blockdev "driver=file,node-name=file0,filename=$1" \
    --blockdev driver=qcow2,node-name=qcow0,file=file0 \
    --export "type=fuse,id=exp0,node-name=qcow0,mountpoint=$QSD_EXPORT,writable=on" \
    </dev/null >>"$WORK/qsd.log" 2>&1 &
  QSD_PID=$!
  local i
  for ((i = 0; i < 300; i++)); do
    is_mounted "$QSD_EXPORT" && return 0
    proc_alive "$QSD_PID" || break
    sleep 0.1
  done
  tail -n 5 "$WORK/qsd.log" >&2
  die "qemu-storage-daemon did not export $QSD_EXPORT"
}

LOOP=""
loop_attach() {  # loop_attach FILE on|off STACK PURPOSE -> $LOOP
  LOOP=$(losetup --find --show --direct-io="$2" "$1") || die "losetup on $1 failed"
  CLEAN_LOOPS+=("$LOOP")
  local actual
  actual=$(cat "/sys/block/${LOOP#/dev/}/loop/dio" 2>/dev/null || echo "?")
  case $actual in 1) actual=on ;; 0) actual=off ;; esac
  record loop stack="$3" purpose="$4" requested="$2" actual="$actual" device="$LOOP"
  [[ $actual == "$2" ]] || log "note: $LOOP on $1: asked for direct-io=$2, the kernel uses $actual"
}

loop_detach() {
  losetup -d "$1"
  local keep=() l
  for l in "${CLEAN_LOOPS[@]}"; do [[ $l == "$1" ]] || keep+=("$l"); done
  CLEAN_LOOPS=("${keep[@]}")
}

mount_ext4() {  # mount_ext4 DEV DIR
  mkdir -p "$2"
  mount -o noatime "$1" "$2" || return 1
  CLEAN_MOUNTS+=("$2")
}

umount_ext4() {
  umount "$1"
  local keep=() m
  for m in "${CLEAN_MOUNTS[@]}"; do [[ $m == "$1" ]] || keep+=("$m"); done
  CLEAN_MOUNTS=("${keep[@]}")
}

# ------------------------------------------------------------------------- fio
FIO_COMMON=(--ioengine=libaio --direct=1 --randrepeat=1 --group_reporting --output-format=json)
FIO_N=0

fio_job() {  # fio_job STACK TARGET PHASE JOB DESC fio-args...
  local stack=$1 target=$2 phase=$3 job=$4 desc=$5 rc=0 base
  shift 5
  FIO_N=$((FIO_N + 1))
  base="$WORK/fio/$(printf %03d "$FIO_N")-$stack-$job-$phase"
  log "$stack: $desc"
  run_child timeout -k 30 "$FIO_TIMEOUT" fio --name="$job" "${FIO_COMMON[@]}" --output="$base.json" "$@" \
    >"$base.err" 2>&1 || rc=$?
  "$PY" "$HELPER" fio-record --json "$base.json" --stderr "$base.err" --rc "$rc" --stack "$stack" \
    --job "$job" --phase "$phase" --target "$target" --desc "$desc" >>"$RECORDS"
  check_daemons
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    log "!!! fio timed out after ${FIO_TIMEOUT} s on $stack ($desc)"
    if [[ $target == ebsfs || $target == plain ]]; then
      ABORT_REASON="fio hung on $stack ($desc)"
      exit 1
    fi
  fi
}

# Verified write: crc32c in every block, fatal on the first mismatch, and the verify
# state saved so that the data can be checked again later (verify_only).
write_opts() {  # write_opts AUXDIR -> WOPTS
  WOPTS=(--verify=crc32c --verify_fatal=1 --verify_state_save=1 --aux-path="$1" --refill_buffers)
}
readback_opts() {
  ROPTS=(--verify=crc32c --verify_fatal=1 --verify_only=1 --verify_state_load=1 --aux-path="$1")
}

# ------------------------------------------------------------------------ stacks
declare -A JOBARGS=()

run_stack() {  # run_stack STACK LOOPDIO
  local stack=$1 dio=$2 target img mnt aux a b c
  case $stack in plain) target=plain ;; qcow2) target=qcow2 ;; *) target=ebsfs ;; esac
  mnt="$WORK/m-$stack"
  aux="$WORK/state/$stack"
  mkdir -p "$aux"
  log "=== stack $stack: ext4 on a loop device (direct-io=$dio), image $((IMG_SIZE / MiB)) MiB"
  case $stack in
    plain)
      img="$WORK/plain.img"
      truncate -s "$IMG_SIZE" "$img" ;;
    ebsfs-*)
      img="$EBSFS_MNT/volumes/$stack.img"
      truncate -s "$IMG_SIZE" "$img" ;;
    qcow2)
      qemu-img create -q -f qcow2 "$WORK/peer.qcow2" "$IMG_SIZE"
      img="$WORK/peer.export"
      start_qsd "$WORK/peer.qcow2" "$img" ;;
  esac
  loop_attach "$img" "$dio" "$stack" bench
  local dev=$LOOP
  if ! mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$dev" >"$WORK/mkfs.log" 2>&1 \
     || ! mount_ext4 "$dev" "$mnt"; then
    log "!!! mkfs.ext4 / mount failed on the $stack stack: $(tail -n 2 "$WORK/mkfs.log" | tr '\n' ' ')"
    record failure what="$stack stack" detail="mkfs.ext4 or mount of the fresh filesystem failed (corrupt device?): $(dmesg | tail -n 2 | tr '\n' ' ')" \
      fatal="$([[ $target == qcow2 ]] && echo 0 || echo 1)"
    loop_detach "$dev"
    teardown_backing "$stack" "$img"
    [[ $target == qcow2 ]] || FATAL=1
    return 0
  fi
  a="$mnt/seq.dat"; b="$mnt/rand.dat"; c="$mnt/fsync.dat"
  write_opts "$aux"
  JOBARGS[seqwrite]="--filename=$a --rw=write --bs=1M --iodepth=8 --size=$FILE --randseed=101"
  JOBARGS[prefill]="--filename=$b --rw=write --bs=1M --iodepth=8 --size=$FILE --randseed=102"
  JOBARGS[randwrite]="--filename=$b --rw=randwrite --bs=4k --iodepth=32 --size=$FILE --io_size=$RW_IO --runtime=$RAND_CAP --randseed=103"
  JOBARGS[prefillfs]="--filename=$c --rw=write --bs=1M --iodepth=8 --size=$FS_FILE --randseed=104"
  JOBARGS[fsyncwrite]="--filename=$c --rw=randwrite --bs=4k --iodepth=1 --fsync=1 --size=$FS_FILE --io_size=$FS_IO --runtime=$RAND_CAP --randseed=105"
  local -a args
  read -ra args <<<"${JOBARGS[seqwrite]}"
  fio_job "$stack" "$target" write seqwrite "seq write 1 MiB QD8, $((FILE / MiB)) MiB (verified)" "${args[@]}" "${WOPTS[@]}"
  drop_caches
  fio_job "$stack" "$target" read seqread "seq read 1 MiB QD8, cold, one pass" \
    --filename="$a" --rw=read --bs=1M --iodepth=8 --size="$FILE" --runtime="$((RAND_CAP * 2))"
  read -ra args <<<"${JOBARGS[prefill]}"
  fio_job "$stack" "$target" prefill prefill "prefill the random-I/O file (verified)" "${args[@]}" "${WOPTS[@]}"
  read -ra args <<<"${JOBARGS[randwrite]}"
  fio_job "$stack" "$target" write randwrite "rand write 4 KiB QD32, $((RW_IO / MiB)) MiB or ${RAND_CAP} s (verified)" "${args[@]}" "${WOPTS[@]}"
  drop_caches
  fio_job "$stack" "$target" read randread "rand read 4 KiB QD32, cold, each block at most once" \
    --filename="$b" --rw=randread --bs=4k --iodepth=32 --size="$FILE" --io_size="$RR_IO" --runtime="$RAND_CAP"
  drop_caches
  fio_job "$stack" "$target" read randreadqd1 "rand read 4 KiB QD1 (latency)" \
    --filename="$b" --rw=randread --bs=4k --iodepth=1 --size="$FILE" --io_size="$R1_IO" --runtime="$RAND_CAP" \
    --lat_percentiles=1 --percentile_list=50:99 --randseed=106
  read -ra args <<<"${JOBARGS[prefillfs]}"
  fio_job "$stack" "$target" prefill prefillfs "prefill the fsync file (verified)" "${args[@]}" "${WOPTS[@]}"
  read -ra args <<<"${JOBARGS[fsyncwrite]}"
  fio_job "$stack" "$target" write fsyncwrite "rand write 4 KiB QD1 fsync=1, $((FS_IO / KiB)) KiB or ${RAND_CAP} s (verified)" "${args[@]}" "${WOPTS[@]}"

  # Read-back: a fresh loop device on the image (direct I/O where the backing allows it)
  # after dropping all caches, then verify_only of every measured write job.
  log "$stack: read-back verification through a fresh loop device"
  INJECT_BLOCK=$(filefrag -e -b4096 "$a" | awk '$1=="0:"{split($4,p,"."); print p[1] + 16}')
  umount_ext4 "$mnt"
  loop_detach "$dev"
  local rdio=on
  if [[ $stack == qcow2 ]]; then
    stop_qsd
    drop_caches
    start_qsd "$WORK/peer.qcow2" "$img"
    rdio=$QCOW2_LOOP_DIO
  fi
  if [[ ${BENCH_INJECT_CORRUPTION:-} == "$stack" ]]; then
    # Test hook for the harness itself: overwrite 1 MiB of seq.dat's data in the image
    # behind the filesystem's back, to prove that a corruption is reported.
    log "BENCH_INJECT_CORRUPTION: overwriting 1 MiB of seq.dat in the $stack image"
    dd if=/dev/urandom of="$img" bs=4096 seek="$INJECT_BLOCK" count=256 conv=notrunc status=none
  fi
  drop_caches
  loop_attach "$img" "$rdio" "$stack" readback
  dev=$LOOP
  if mount_ext4 "$dev" "$mnt"; then
    readback_opts "$aux"
    local j
    for j in seqwrite randwrite fsyncwrite; do
      read -ra args <<<"${JOBARGS[$j]}"
      fio_job "$stack" "$target" readback "$j" "read-back verify of $j" "${args[@]}" "${ROPTS[@]}"
    done
    umount_ext4 "$mnt"
  else
    record failure what="$stack stack" detail="the filesystem does not mount again for the read-back" \
      fatal="$([[ $target == qcow2 ]] && echo 0 || echo 1)"
  fi
  loop_detach "$dev"
  teardown_backing "$stack" "$img"
}

teardown_backing() {  # teardown_backing STACK IMG
  case $1 in
    plain) rm -f "$2" ;;
    ebsfs-*) rm -f "$2" ;;
    qcow2) stop_qsd; rm -f "$WORK/peer.qcow2" "$WORK/peer.export" ;;
  esac
}

# --------------------------------------------------------------------- snapshots
snap_mkdir_wait() {  # snap_mkdir_wait NAME LABEL
  "$PY" "$HELPER" snap-mkdir --mnt "$EBSFS_MNT" --name "$1" --label "$2" --wait \
    --timeout "$SNAP_TIMEOUT" --block-size "$CFG_BLOCK_SIZE" >>"$RECORDS" || snap_failed "$1"
  check_daemons
}

snap_failed() {
  local st
  st=$("$PY" "$HELPER" snap-status --mnt "$EBSFS_MNT" --name "$1" 2>/dev/null || echo "?")
  log "!!! snapshot $1 did not complete (status: $st)"
  ABORT_REASON="snapshot $1 did not complete (status $st)"
  FATAL=1
  exit 1
}

sha_of() {  # sha_of FILE LABEL -> SHA (and records the bytes read through ebsfs)
  SHA=$(sha256sum "$1" | awk '{print $1}')
  record io label="$2" target=ebsfs bytes="$(stat -c %s "$1")"
}

remove_volume() {  # remove_volume NAME: deletes its snapshots, then the volume
  local s
  for s in "$EBSFS_MNT/snapshots/$1@"*; do
    [[ -d $s ]] && rmdir "$s"
  done
  rm -f "$EBSFS_MNT/volumes/$1.img"
}

run_snapshots() {
  local m=$EBSFS_MNT aux="$WORK/state/snap" vol cap_s fg_t
  mkdir -p "$aux"
  write_opts "$aux"
  record meta snap_sizes="mkdir latency on $((V_SMALL / MiB)) MiB and $((V_LARGE / MiB)) MiB volumes (large one filled with unique 95%-compressible blocks), capture of $((CAP / MiB)) MiB changed"

  # --- capture throughput, foreground writes during a capture, image reads, stored/changed
  vol="$m/volumes/cap.img"
  log "=== snapshots: capture volume of $((CAP / MiB)) MiB"
  truncate -s "$CAP" "$vol"
  fio_job snap ebsfs prefill fill1 "fill the volume with random data (verified)" \
    --filename="$vol" --rw=write --bs=1M --iodepth=8 --size="$CAP" --randseed=201 "${WOPTS[@]}"
  snap_mkdir_wait cap@base first-capture
  fio_job snap ebsfs prefill fill2 "rewrite the whole volume with new random data (verified)" \
    --filename="$vol" --rw=write --bs=1M --iodepth=8 --size="$CAP" --randseed=202 "${WOPTS[@]}"
  sha_of "$vol" sha-live-full; local sha_full=$SHA
  drop_caches
  log "snap: capture of $((CAP / MiB)) MiB changed, cold cache"
  snap_mkdir_wait cap@full capture
  cap_s=$(tail -n 1 "$RECORDS" | "$PY" -c 'import json,sys; print(json.load(sys.stdin).get("capture_s", 5))')
  sha_of "$m/snapshots/cap@full/volume.img" sha-image-full
  if [[ $SHA == "$sha_full" ]]; then
    record check what="snapshot image = volume at mkdir (idle capture)" ok=1
  else
    log "!!! snapshot cap@full volume.img differs from the volume at mkdir time"
    record check what="snapshot image = volume at mkdir (idle capture)" ok=0 detail="sha256 $SHA != $sha_full"
  fi

  # Foreground random writes, idle and during a capture. Same job, time-limited to ~60%
  # of the idle capture time so that it ends while the capture still runs.
  fg_t=$("$PY" -c "print(max(2, min(60, int(float('$cap_s') * 0.6))))")
  readback_opts "$aux"
  local fgargs=(--filename="$vol" --rw=randwrite --bs=4k --iodepth=32 --size="$CAP" --io_size="$CAP" --runtime="$fg_t")
  fio_job snap ebsfs fg fgidle "foreground rand write 4 KiB QD32, ${fg_t} s, idle (verified)" \
    "${fgargs[@]}" --randseed=203 "${WOPTS[@]}"
  fio_job snap ebsfs readback fgidle "read-back verify of fgidle" "${fgargs[@]}" --randseed=203 "${ROPTS[@]}"
  fio_job snap ebsfs prefill fill3 "rewrite the whole volume again (verified)" \
    --filename="$vol" --rw=write --bs=1M --iodepth=8 --size="$CAP" --randseed=204 "${WOPTS[@]}"
  sha_of "$vol" sha-live-busy; local sha_busy=$SHA
  drop_caches
  local started t0 ms watcher fio_start
  started=$("$PY" "$HELPER" snap-mkdir --mnt "$m" --name cap@busy --label busy-capture) || snap_failed cap@busy
  t0=$(echo "$started" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["t0_ns"])')
  ms=$(echo "$started" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["mkdir_ms"])')
  # Watch the capture in the background while the foreground job runs.
  "$PY" "$HELPER" snap-wait --mnt "$m" --name cap@busy --label busy-capture --t0-ns "$t0" --mkdir-ms "$ms" \
    --timeout "$SNAP_TIMEOUT" --block-size "$CFG_BLOCK_SIZE" >"$WORK/busy.json" &
  watcher=$!
  BG_PIDS+=("$watcher")
  fio_start=$(date +%s.%N)
  fio_job snap ebsfs fg fgbusy "foreground rand write 4 KiB QD32, ${fg_t} s, during the capture (verified)" \
    "${fgargs[@]}" --randseed=205 "${WOPTS[@]}"
  CHILD=$watcher
  wait "$watcher" || { cat "$WORK/busy.json" >>"$RECORDS"; snap_failed cap@busy; }
  CHILD=""
  cat "$WORK/busy.json" >>"$RECORDS"
  record overlap fio_start="$fio_start"
  fio_job snap ebsfs readback fgbusy "read-back verify of fgbusy" "${fgargs[@]}" --randseed=205 "${ROPTS[@]}"
  sha_of "$m/snapshots/cap@busy/volume.img" sha-image-busy
  if [[ $SHA == "$sha_busy" ]]; then
    record check what="snapshot image = volume at mkdir (capture under foreground writes)" ok=1
  else
    log "!!! snapshot cap@busy volume.img differs from the volume at mkdir time (foreground writes leaked in?)"
    record check what="snapshot image = volume at mkdir (capture under foreground writes)" ok=0 detail="sha256 $SHA != $sha_busy"
  fi

  # Cold sequential read of a completed snapshot image against the live volume.
  drop_caches
  fio_job snap ebsfs read snapread "cold seq read 1 MiB QD8 of snapshots/cap@full/volume.img" \
    --filename="$m/snapshots/cap@full/volume.img" --readonly --rw=read --bs=1M --iodepth=8 --size="$CAP"
  drop_caches
  fio_job snap ebsfs read liveread "cold seq read 1 MiB QD8 of the live volume" \
    --filename="$vol" --rw=read --bs=1M --iodepth=8 --size="$CAP"

  # The capture volume and its snapshots stay until the end: deleting a volume frees its
  # chunks one by one and holds the namespace lock meanwhile (timed at the end).

  "$PY" "$HELPER" daemon-stats --pid "$EBSFS_PID" --label "after the capture-volume figures" >>"$RECORDS"

  # --- mkdir latency on a small and a large fully written volume
  log "=== snapshots: mkdir latency, $((V_SMALL / MiB)) MiB volume"
  truncate -s "$V_SMALL" "$m/volumes/small.img"
  fio_job snap ebsfs prefill fillsmall "fill the volume with random data (verified)" \
    --filename="$m/volumes/small.img" --rw=write --bs=1M --iodepth=8 --size="$V_SMALL" --randseed=401 "${WOPTS[@]}"
  "$PY" "$HELPER" mkdir-series --mnt "$m" --volume small --count "$MKDIR_N" --timeout "$SNAP_TIMEOUT" \
    --label mkdir-small >>"$RECORDS" || { ABORT_REASON="mkdir series on the small volume failed"; FATAL=1; exit 1; }
  check_daemons

  # Bytes stored per byte changed: 1% of the blocks of the small volume (its last snapshot
  # is complete and nothing changed since).
  "$PY" "$HELPER" write-blocks --file "$m/volumes/small.img" --block-size "$CFG_BLOCK_SIZE" --fraction 0.01 \
    --mode aligned --seed 301 --label aligned >>"$RECORDS"
  snap_mkdir_wait small@aligned aligned
  "$PY" "$HELPER" write-blocks --file "$m/volumes/small.img" --block-size "$CFG_BLOCK_SIZE" --fraction 0.01 \
    --mode scattered --seed 302 --label scattered >>"$RECORDS"
  snap_mkdir_wait small@scattered scattered

  "$PY" "$HELPER" daemon-stats --pid "$EBSFS_PID" --label "after the small volume" >>"$RECORDS"
  log "=== snapshots: mkdir latency, $((V_LARGE / MiB)) MiB volume (unique, 95%-compressible blocks)"
  truncate -s "$V_LARGE" "$m/volumes/large.img"
  fio_job snap ebsfs prefill filllarge "fill the volume with compressible unique blocks (verified)" \
    --filename="$m/volumes/large.img" --rw=write --bs=1M --iodepth=8 --size="$V_LARGE" --randseed=402 \
    --buffer_compress_percentage=95 --buffer_compress_chunk=4k --verify_interval=4k "${WOPTS[@]}"
  "$PY" "$HELPER" mkdir-series --mnt "$m" --volume large --count "$MKDIR_N" --timeout "$SNAP_TIMEOUT" \
    --label mkdir-large >>"$RECORDS" || { ABORT_REASON="mkdir series on the large volume failed"; FATAL=1; exit 1; }
  check_daemons

  # Informational: how long deleting a volume with snapshots takes.
  log "snap: deleting the small volume's snapshots, then the volume (timed)"
  local t1 t2
  t1=$(date +%s.%N)
  remove_volume small
  t2=$(date +%s.%N)
  record timing what="delete the $((V_SMALL / MiB)) MiB volume after rmdir of its snapshots" \
    seconds="$("$PY" -c "print(round($t2 - $t1, 2))")"
}

# ------------------------------------------------------------------------ clones
# A clean stop of the daemon, caches dropped, and a new mount of the same data
# directory with `hydrate` set to $1 in a copy of the config.
restart_ebsfs() {  # restart_ebsfs true|false LABEL
  "$PY" "$HELPER" daemon-stats --pid "$EBSFS_PID" --label "$2" >>"$RECORDS"
  log "restarting ebsfs with hydrate = $1"
  stop_ebsfs
  "$PY" "$HELPER" config-set --file "$CONFIG" --out "$WORK/ebsfs.toml" "hydrate=$1" \
    || die "cannot write the config with hydrate = $1"
  drop_caches
  start_ebsfs
  record restart hydrate="$1" pid="$EBSFS_PID"
}

clone_reads() {  # clone_reads PHASE A B: the random-read jobs on files A and B, ROUNDS times
  local phase=$1 a=$2 b=$3 round qd f first second
  local -a common=(--readonly --rw=randread --bs=4k --size="$V_SMALL" --runtime="$RAND_CAP")
  local -A path=([${phase%%-*}]=$a [${phase#*-}]=$b)
  for round in $(seq "$ROUNDS"); do
    # Alternate which file goes first: the daemon's chunk cache is shared.
    if (( round % 2 )); then first=${phase%%-*}; second=${phase#*-}; else first=${phase#*-}; second=${phase%%-*}; fi
    for qd in 32 1; do
      for f in "$first" "$second"; do
        drop_caches
        if [[ $qd == 32 ]]; then
          fio_job clone ebsfs read "rr32-$f" "rand read 4 KiB QD32 of $(basename "$(dirname "${path[$f]}")")/$(basename "${path[$f]}"), cold (round $round)" \
            "${common[@]}" --filename="${path[$f]}" --iodepth=32 --io_size="$CL_RR_IO"
        else
          fio_job clone ebsfs read "rr1-$f" "rand read 4 KiB QD1 of $(basename "$(dirname "${path[$f]}")")/$(basename "${path[$f]}"), cold (round $round)" \
            "${common[@]}" --filename="${path[$f]}" --iodepth=1 --io_size="$R1_IO" --randseed=506 \
            --lat_percentiles=1 --percentile_list=50:99
        fi
      done
    done
  done
}

clone_check() {  # clone_check WHAT SHA EXPECTED
  if [[ $2 == "$3" ]]; then
    record check group=clones what="$1" ok=1
  else
    log "!!! $1: sha256 differs"
    record check group=clones what="$1" ok=0 detail="sha256 $2 != $3"
  fi
}

run_clones() {
  local m aux="$WORK/state/clone" big big_what i n sha_src du0 du1 img cl v
  mkdir -p "$aux"
  # Copies are timed with hydration off: a background hydration of the large copies
  # would need their whole size on disk, and the unhydrated reads need it off.
  restart_ebsfs false "before the clone figures"
  m=$EBSFS_MNT

  log "=== clones: source volume of $((V_SMALL / MiB)) MiB, random data"
  truncate -s "$V_SMALL" "$m/volumes/csrc.img"
  write_opts "$aux"
  fio_job clone ebsfs prefill fillcsrc "fill the source volume with random data (verified)" \
    --filename="$m/volumes/csrc.img" --rw=write --bs=1M --iodepth=8 --size="$V_SMALL" --randseed=501 "${WOPTS[@]}"
  snap_mkdir_wait csrc@c clone-source
  sha_of "$m/volumes/csrc.img" sha-clone-source; sha_src=$SHA

  if [[ $ONLY == all ]]; then
    # The snapshot figures' large volume (32 GiB once is all the disk there is).
    big="large@m$MKDIR_N"
    big_what="the snapshot figures' fully written volume, unique 95%-compressible 4 KiB blocks"
  else
    log "=== clones: $((V_LARGE / MiB)) MiB source: the small source's random data, repeated"
    truncate -s "$V_LARGE" "$m/volumes/clarge.img"
    n=$((V_SMALL / MiB))
    for ((i = 0; i < V_LARGE / V_SMALL; i++)); do
      run_child dd if="$m/volumes/csrc.img" of="$m/volumes/clarge.img" bs=1M count="$n" seek=$((i * n)) \
        iflag=direct oflag=direct conv=notrunc status=none || die "writing the large clone source failed"
    done
    check_daemons
    record io label=clarge-fill target=ebsfs bytes=$((2 * V_LARGE))
    snap_mkdir_wait clarge@c clone-large-source
    big=clarge@c
    big_what="fully written with incompressible random data: the small source's $((V_SMALL / MiB)) MiB repeated, so its chunks are the small source's"
  fi
  record meta clone_sizes="$((V_SMALL / MiB)) MiB source csrc@c (random data, fio-verified) and $((V_LARGE / MiB)) MiB snapshot $big ($big_what); reads: $((CL_RR_IO / MiB)) MiB at QD32, $((R1_IO / MiB)) MiB at QD1, cap $RAND_CAP s, medians of $ROUNDS round(s)"

  # --- time to copy, and the disk it takes
  sync
  du0=$(du -s -B1 "$WORK/ebsfs-data" | cut -f1)
  local which snap
  for v in "small csrc@c" "large $big"; do
    read -r which snap <<<"$v"
    "$PY" "$HELPER" clone-time --mnt "$m" --data-dir "$WORK/ebsfs-data" --snapshot "$snap" --method cp --count "$CLONE_N" \
      --prefix "ct-cp-$which-" --label "cp-$which" >>"$RECORDS" \
      || { ABORT_REASON="cp of snapshot $snap into volumes/ failed"; FATAL=1; exit 1; }
    "$PY" "$HELPER" clone-time --mnt "$m" --data-dir "$WORK/ebsfs-data" --snapshot "$snap" --method create --bin "$BIN" --count "$CLONE_N" \
      --prefix "ct-cr-$which-" --label "create-$which" >>"$RECORDS" \
      || { ABORT_REASON="ebsfs volume create --from $snap failed"; FATAL=1; exit 1; }
    check_daemons
  done
  sync
  du1=$(du -s -B1 "$WORK/ebsfs-data" | cut -f1)
  record du what=clones before="$du0" after="$du1" copies=$((4 * CLONE_N)) \
    bytes=$((2 * CLONE_N * (V_SMALL + $(stat -c %s "$m/snapshots/$big/volume.img"))))
  log "clones: data directory $du0 -> $du1 bytes after $((4 * CLONE_N)) copies"
  rm -f "$m/volumes/ct-"*.img

  # --- reads of a copy that is not hydrated, against the snapshot image
  img="$m/snapshots/csrc@c/volume.img"
  cl="$m/volumes/cread.img"
  cp "$img" "$cl"
  clone_reads image-clone "$img" "$cl"
  sha_of "$cl" sha-clone-unhydrated
  clone_check "copy of a snapshot, not hydrated = its source volume" "$SHA" "$sha_src"
  record xattr what=hydrated-before file=cread value="$("$PY" "$HELPER" xattr --file "$cl" --name user.ebsfs.hydrated)"

  # --- hydration, then reads of the copy against the source volume (same data)
  restart_ebsfs true "after the unhydrated-clone reads"
  "$PY" "$HELPER" hydrate-wait --file "$cl" --timeout "$SNAP_TIMEOUT" --label hydrate >>"$RECORDS" \
    || { ABORT_REASON="the copy did not hydrate within $SNAP_TIMEOUT s"; FATAL=1; exit 1; }
  check_daemons
  clone_reads hclone-volume "$cl" "$m/volumes/csrc.img"
  sha_of "$cl" sha-clone-hydrated
  clone_check "copy of a snapshot, hydrated = its source volume" "$SHA" "$sha_src"
  "$PY" "$HELPER" daemon-stats --pid "$EBSFS_PID" --label "after the clone figures" >>"$RECORDS"
}

# ------------------------------------------------------------------------ bucket
# Snapshots in an S3-compatible bucket: s3s-fs or a single Garage node on loopback, two
# ebsfs hosts (A captures and uploads, B copies A's snapshot and hydrates the copy from
# the bucket). Requests are counted in the server's own log (one line per HTTP request
# it receives).
S3S_PID=""
S3S_PORT=""
S3S_LOG=""
BUCKET=ebsfs-bench
S3_REGION=us-east-1
EBSFS_B_PID=""
EBSFS_B_MNT=""

bucket_config() {  # bucket_config OUT HOST_ID HYDRATE: CONFIG with host_id, hydrate and [store]
  "$PY" "$HELPER" config-set --file "$CONFIG" --out "$1" "host_id=\"$2\"" "hydrate=$3" \
    || die "cannot write the config for host $2"
  cat >>"$1" <<EOF

[store]
url = "s3://$BUCKET/bench"
endpoint = "http://127.0.0.1:$S3S_PORT"
region = "$S3_REGION"
path_style = true
poll_seconds = 1
EOF
}

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

prepare_garage() {  # a single Garage node, replication factor 1; key and bucket made
  local d="$WORK/garage" id="" i rpc admin key_id=GK0123456789abcdef01234567
  # ebsfs compresses (and may encrypt) its chunks itself, so Garage's own zstd pass
  # only costs CPU: off, as the README advises. GARAGE_COMPRESSION=1 (Garage's
  # default) or another level measures with it.
  local compression=${GARAGE_COMPRESSION:-none}
  [[ $compression =~ ^[0-9]+$ ]] || compression="\"$compression\""
  S3S_PORT=$(free_port); rpc=$(free_port); admin=$(free_port)
  S3S_LOG="$d/log"
  S3_REGION=garage
  mkdir -p "$d/meta" "$d/data"
  cat >"$d/garage.toml" <<EOF
metadata_dir = "$d/meta"
data_dir = "$d/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = $compression
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3S_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
EOF
  chmod 600 "$d/garage.toml"
  log "starting garage ($GARAGE) on 127.0.0.1:$S3S_PORT, data $d"
  # Info level logs one line per request: `<client address> <METHOD> <path>`.
  NO_COLOR=1 RUST_LOG=garage_api_common=info,warn setsid "$GARAGE" -c "$d/garage.toml" server \
    </dev/null >"$S3S_LOG" 2>&1 &
  S3S_PID=$!
  BG_PIDS+=("$S3S_PID")
  # `node id` reads the node's key file, so it may answer before the server takes RPC
  # calls: `status` must answer too.
  for ((i = 0; i < 100; i++)); do
    id=$("$GARAGE" -c "$d/garage.toml" node id -q 2>/dev/null) \
      && "$GARAGE" -c "$d/garage.toml" status >/dev/null 2>&1 && break
    id=""
    proc_alive "$S3S_PID" || { tail -n 5 "$S3S_LOG" >&2; die "garage exited"; }
    sleep 0.2
  done
  [[ -n $id ]] || die "garage does not answer"
  gcli() { "$GARAGE" -c "$d/garage.toml" "$@" >/dev/null; }
  gcli layout assign -z dc1 -c 100G "${id:0:16}" && gcli layout apply --version 1 \
    && gcli key import --yes -n ebsfs-bench "$key_id" "$S3S_SECRET" \
    && gcli bucket create "$BUCKET" \
    && gcli bucket allow --read --write --owner "$BUCKET" --key ebsfs-bench \
    || die "cannot set garage up (see $S3S_LOG)"
  export AWS_ACCESS_KEY_ID=$key_id AWS_SECRET_ACCESS_KEY=$S3S_SECRET
}

prepare_bucket() {
  grep -Eq '^[[:space:]]*\[store\]' "$CONFIG" && die "--only bucket writes its own [store] table: use a config without one"
  if [[ $S3_SERVER == garage ]]; then
    prepare_garage
    bucket_config "$WORK/ebsfs.toml" bench-a true
    record meta store_cache_size=$((256 * MiB)) s3_server=garage \
      s3s_fs="$("$GARAGE" --version 2>/dev/null | head -n 1), a single node" \
      bucket_sizes="a $((CAP / MiB)) MiB volume of random data captured by host A into the bucket, then copied by host B and hydrated from it"
    return
  fi
  S3S_PORT=$(free_port)
  S3S_LOG="$WORK/s3s-fs.log"
  mkdir -p "$WORK/s3/$BUCKET"
  log "starting s3s-fs ($S3S) on 127.0.0.1:$S3S_PORT, root $WORK/s3"
  RUST_LOG=s3s::service=debug setsid "$S3S" --host 127.0.0.1 --port "$S3S_PORT" \
    --access-key ebsfs-bench --secret-key "$S3S_SECRET" "$WORK/s3" </dev/null >"$S3S_LOG" 2>&1 &
  S3S_PID=$!
  BG_PIDS+=("$S3S_PID")
  local i
  for ((i = 0; i < 100; i++)); do
    grep -q 'server is running' "$S3S_LOG" 2>/dev/null && break
    proc_alive "$S3S_PID" || { tail -n 5 "$S3S_LOG" >&2; die "s3s-fs exited"; }
    sleep 0.1
  done
  export AWS_ACCESS_KEY_ID=ebsfs-bench AWS_SECRET_ACCESS_KEY=$S3S_SECRET
  bucket_config "$WORK/ebsfs.toml" bench-a true
  record meta store_cache_size=$((256 * MiB)) s3_server=s3s-fs s3s_fs="$("$S3S" --version 2>/dev/null | head -n 1)" \
    bucket_sizes="a $((CAP / MiB)) MiB volume of random data captured by host A into the bucket, then copied by host B and hydrated from it"
}

s3s_requests() {  # s3s_requests METHOD: requests with that method the server has received
  if [[ $S3_SERVER == garage ]]; then
    # `<address> <METHOD> <path>`; an error line repeats its request after "in response to".
    grep -E " $1 /" "$S3S_LOG" | grep -vc "in response to" || true
  else
    grep -c "req: Request { method: $1," "$S3S_LOG" || true
  fi
}

bucket_usage() {  # bucket_usage: `bucket_bytes=… bucket_objects=…` of the bucket now
  if [[ $S3_SERVER == garage ]]; then
    echo "bucket_bytes=$(du -s -B1 "$WORK/garage/data" | cut -f1)" \
      "bucket_objects=$("$GARAGE" -c "$WORK/garage/garage.toml" bucket info "$BUCKET" 2>/dev/null \
        | awk '/^Objects:/ {print $2; exit}')"
  else
    echo "bucket_bytes=$(du -s -B1 "$WORK/s3/$BUCKET" | cut -f1)" \
      "bucket_objects=$(find "$WORK/s3/$BUCKET" -type f | wc -l)"
  fi
}

stop_ebsfs_b() {
  [[ -n $EBSFS_B_PID ]] || return 0
  local i rc=0
  kill -TERM "$EBSFS_B_PID" 2>/dev/null || true
  for ((i = 0; i < 1800; i++)); do proc_alive "$EBSFS_B_PID" || break; sleep 0.1; done
  if proc_alive "$EBSFS_B_PID"; then
    record failure what="ebsfs daemon (host B)" detail="did not exit within 180 s of SIGTERM; killed" fatal=1
    kill -KILL "$EBSFS_B_PID" 2>/dev/null || true
  fi
  wait "$EBSFS_B_PID" 2>/dev/null || rc=$?
  [[ $rc -eq 0 ]] || record failure what="ebsfs daemon (host B)" detail="exited with status $rc after SIGTERM" fatal=1
  EBSFS_B_PID=""
  if is_mounted "$EBSFS_B_MNT"; then umount -l "$EBSFS_B_MNT"; fi
  return 0
}

start_ebsfs_b() {  # host B on $WORK/ebsfs-data-b; returns once it lists up@s3@bench-a
  local i
  RUST_LOG=${RUST_LOG:-info} setsid "$BIN" mount "$EBSFS_B_MNT" --data-dir "$WORK/ebsfs-data-b" \
    --config "$WORK/ebsfs-b.toml" </dev/null >>"$WORK/ebsfs-b.log" 2>&1 &
  EBSFS_B_PID=$!
  BG_PIDS+=("$EBSFS_B_PID")
  for ((i = 0; i < 600; i++)); do
    [[ -e $EBSFS_B_MNT/snapshots/up@s3@bench-a/volume.img ]] && return 0
    proc_alive "$EBSFS_B_PID" || { tail -n 20 "$WORK/ebsfs-b.log" >&2; die "ebsfs host B exited"; }
    sleep 0.1
  done
  die "host B does not list up@s3@bench-a after 60 s"
}

# The server's own rates, measured with curl (a client that does no work of its own) in
# the same run, so that the capture and hydration figures can be read against what the
# server gives at most on this machine.
s3_curl_env() {  # s3_curl_env: exports what the curl commands below use
  export CEIL_BASE="http://127.0.0.1:$S3S_PORT/$BUCKET" CEIL_SIG="aws:amz:$S3_REGION:s3"
}
# shellcheck disable=SC2016 # expanded by the shells xargs starts
S3_CURL='curl -sf --aws-sigv4 "$CEIL_SIG" -u "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -o /dev/null'

# shellcheck disable=SC2016 # the single-quoted parts are for the shells xargs starts
server_put_ceiling() {  # server_put_ceiling: PUT host A's packs again, in 32 MiB objects, 4 at once
  # Distinct data (Garage stores a block it already holds only once): host A's local
  # packs, split into objects of the size ebsfs sends, read from disk as the upload does.
  local src="$WORK/put-source" t0 t1 n
  s3_curl_env
  mkdir -p "$src"
  cat "$WORK"/ebsfs-data/chunks/pack-*.dat | split -b $((32 * MiB)) -a 4 - "$src/" \
    || { log "!!! cannot split host A's packs: no server PUT figure"; rm -rf "$src"; return 0; }
  n=$(find "$src" -type f | wc -l)
  drop_caches
  t0=$(date +%s.%N)
  find "$src" -type f -printf '%f\n' | xargs -P 4 -I{} sh -c "$S3_CURL"' -T "$0/{}" "$CEIL_BASE/ceiling/{}"' "$src" \
    || { log "!!! a PUT with curl failed: no server PUT figure"; rm -rf "$src"; return 0; }
  t1=$(date +%s.%N)
  record server_put bytes="$(du -s -B1 --apparent-size "$src" | cut -f1)" requests="$n" \
    seconds="$("$PY" -c "print($t1 - $t0)")"
  log "bucket: the server's own PUT rate: $(du -s -BM --apparent-size "$src" | cut -f1) in $n PUTs (curl, 4 at once)"
  find "$src" -type f -printf '%f\n' | xargs -P 4 -I{} sh -c "$S3_CURL"' -X DELETE "$CEIL_BASE/ceiling/{}"' \
    || log "!!! deleting the objects of the PUT figure failed"
  rm -rf "$src"
}

# shellcheck disable=SC2016 # the single-quoted parts are for the shells xargs starts
server_get_ceiling() {  # server_get_ceiling: GET every pack in the bucket in 4 MiB ranges, 16 at once
  local list="$WORK/packs.xml" ranges="$WORK/pack-ranges" t0 t1 bytes n
  s3_curl_env
  sh -c "${S3_CURL%-o /dev/null}"' -o "$0" "$CEIL_BASE?list-type=2&max-keys=1000&prefix=bench%2Fpacks%2F"' "$list" \
    || { log "!!! cannot list the bucket's packs with curl: no server GET figure"; return 0; }
  "$PY" - "$list" >"$ranges" <<'PYEOF'
import re, sys
for key, size in re.findall(r"<Key>([^<]+)</Key>.*?<Size>(\d+)</Size>", open(sys.argv[1]).read(), re.S):
    for start in range(0, int(size), 4 << 20):
        print(key, f"{start}-{min(start + (4 << 20), int(size)) - 1}")
PYEOF
  n=$(wc -l <"$ranges")
  bytes=$(awk '{ split($2, r, "-"); s += r[2] - r[1] + 1 } END { printf "%.0f", s }' "$ranges")
  drop_caches
  t0=$(date +%s.%N)
  xargs -P 16 -L 1 sh -c "$S3_CURL"' -r "$1" "$CEIL_BASE/$0"' <"$ranges" \
    || { log "!!! a GET of a pack range with curl failed: no server GET figure"; return 0; }
  t1=$(date +%s.%N)
  record server_get bytes="$bytes" requests="$n" seconds="$("$PY" -c "print($t1 - $t0)")"
  log "bucket: the server's own GET rate: $((bytes / MiB)) MiB in $n ranged GETs (curl, 16 at once)"
}

run_bucket() {
  local m=$EBSFS_MNT aux="$WORK/state/bucket" vol put0 post0 get0 put1 post1 sha_src remote b
  mkdir -p "$aux"
  write_opts "$aux"
  vol="$m/volumes/up.img"
  log "=== bucket: $((CAP / MiB)) MiB volume of random data on host A"
  truncate -s "$CAP" "$vol"
  fio_job bucket ebsfs prefill fillup "fill the volume with random data (verified)" \
    --filename="$vol" --rw=write --bs=1M --iodepth=8 --size="$CAP" --randseed=601 "${WOPTS[@]}"
  sha_of "$vol" sha-bucket-source; sha_src=$SHA
  drop_caches
  put0=$(s3s_requests PUT); post0=$(s3s_requests POST); get0=$(s3s_requests GET)
  log "bucket: capture of $((CAP / MiB)) MiB changed into the bucket, cold cache"
  snap_mkdir_wait up@s3 bucket-capture
  put1=$(s3s_requests PUT); post1=$(s3s_requests POST)
  # shellcheck disable=SC2046 # bucket_usage prints two words
  record requests what=capture put=$((put1 - put0)) post=$((post1 - post0)) get=$(( $(s3s_requests GET) - get0 )) \
    $(bucket_usage)
  "$PY" "$HELPER" daemon-stats --pid "$EBSFS_PID" --label "host A after the capture into the bucket" \
    | sed 's/"type": "daemon"/"type": "bucket_daemon"/' >>"$RECORDS"
  server_put_ceiling

  server_get_ceiling

  log "=== bucket: host B copies up@s3@bench-a and hydrates the copy from the bucket"
  b="$WORK/ebsfs-data-b"
  EBSFS_B_MNT="$WORK/ebsfs-mnt-b"
  mkdir -p "$b" "$EBSFS_B_MNT"
  bucket_config "$WORK/ebsfs-b.toml" bench-b true
  drop_caches
  CLEAN_MOUNTS+=("$EBSFS_B_MNT")
  start_ebsfs_b
  remote="$EBSFS_B_MNT/snapshots/up@s3@bench-a/volume.img"
  get0=$(s3s_requests GET)
  cp "$remote" "$EBSFS_B_MNT/volumes/hyd.img" || { ABORT_REASON="cp of up@s3@bench-a on host B failed"; FATAL=1; exit 1; }
  "$PY" "$HELPER" hydrate-wait --file "$EBSFS_B_MNT/volumes/hyd.img" --timeout "$SNAP_TIMEOUT" --poll 0.05 \
    --label bucket-hydrate >>"$RECORDS" \
    || { ABORT_REASON="the copy on host B did not hydrate within $SNAP_TIMEOUT s"; FATAL=1; exit 1; }
  record requests what=hydrate get=$(( $(s3s_requests GET) - get0 ))
  sha_of "$EBSFS_B_MNT/volumes/hyd.img" sha-bucket-copy
  if [[ $SHA == "$sha_src" ]]; then
    record check group=bucket what="copy on host B, hydrated from the bucket = host A's volume (sha256)" ok=1
  else
    log "!!! the copy on host B differs from host A's volume"
    record check group=bucket what="copy on host B, hydrated from the bucket = host A's volume (sha256)" ok=0 \
      detail="sha256 $SHA != $sha_src"
  fi
  "$PY" "$HELPER" daemon-stats --pid "$EBSFS_B_PID" --label "host B after the hydration" \
    | sed 's/"type": "daemon"/"type": "bucket_daemon"/' >>"$RECORDS"
  stop_ebsfs_b

  # Host B again with hydrate = false: a cold sequential read of a new copy that
  # nothing hydrates, every block from the bucket.
  log "=== bucket: host B with hydrate = false reads a new copy of up@s3@bench-a"
  bucket_config "$WORK/ebsfs-b.toml" bench-b false
  drop_caches
  start_ebsfs_b
  cp "$remote" "$EBSFS_B_MNT/volumes/cold.img" || { ABORT_REASON="cp of up@s3@bench-a on host B failed"; FATAL=1; exit 1; }
  get0=$(s3s_requests GET)
  fio_job bucket ebsfs read copyread "cold seq read 1 MiB QD8 of a copy on host B, not hydrated (from the bucket)" \
    --filename="$EBSFS_B_MNT/volumes/cold.img" --readonly --rw=read --bs=1M --iodepth=8 --size="$CAP"
  record requests what=copyread get=$(( $(s3s_requests GET) - get0 ))
  stop_ebsfs_b
}

make_report() {  # make_report [INCOMPLETE-REASON]
  local rc=0
  "$PY" "$HELPER" report --records "$RECORDS" --out-md "$RESULT_BASE.md" --out-json "$RESULT_BASE.json" \
    --incomplete "${1:-}" || rc=$?
  REPORT_DONE=1
  return "$rc"
}

# -------------------------------------------------------------------------- main
[[ $ONLY == bucket ]] && prepare_bucket
start_ebsfs
if [[ $ONLY == all || $ONLY == stacks ]]; then
  # Rounds interleave the stacks, so that drift of the machine (its disk, its host)
  # spreads over all of them; the report takes each figure's median over the rounds.
  for round in $(seq "$ROUNDS"); do
    [[ $ROUNDS -eq 1 ]] || log "=== stacks, round $round of $ROUNDS"
    run_stack plain on
    for d in $EBSFS_LOOP_MODES; do
      if [[ $d == on ]]; then run_stack ebsfs-dio on; else run_stack ebsfs-buf off; fi
    done
    run_stack qcow2 "$QCOW2_LOOP_DIO"
  done
  "$PY" "$HELPER" daemon-stats --pid "$EBSFS_PID" --label "after the stacks" >>"$RECORDS"
fi
if [[ $ONLY == all || $ONLY == snapshots ]]; then
  run_snapshots
fi
if [[ $ONLY == all || $ONLY == clones ]]; then
  run_clones
fi
if [[ $ONLY == bucket ]]; then
  run_bucket
fi
"$PY" "$HELPER" daemon-stats --pid "$EBSFS_PID" --label "at the end" >>"$RECORDS"
log "stopping ebsfs"
stop_ebsfs
grep -q '"type": "failure"' "$RECORDS" && FATAL=1

log "report: $RESULT_BASE.md"
rc=0
make_report >"$WORK/report.out" || rc=$?
cat "$WORK/report.out"
cp "$WORK/ebsfs.log" "$RESULT_BASE.ebsfs.log" 2>/dev/null || true
if [[ $rc -ne 0 || $FATAL -ne 0 ]]; then
  log "!!! FAILURES: ebsfs or plain verification / daemon problems — see the Verification section"
  exit 1
fi
log "done"

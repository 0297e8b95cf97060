#!/usr/bin/env bash
# Scale test (outside CI): two ebsfs hosts sharing a bucket on a 3-node Garage cluster.
#
#   sudo tests/scale/garage.sh
#
# 1. starts a 3-node Garage cluster (replication factor 3) on loopback: RPC on
#    127.0.0.1, each node's S3 API on an address of `lo` the network namespaces reach;
#    layout, key and bucket made with the garage CLI;
# 2. starts two ebsfs hosts, A and B, each in its own network namespace (a veth pair
#    to the root namespace), each with its own data directory, host_id and config
#    (path-style; A reads its credentials from a credentials file, B from the
#    environment), A talking to node 1, B to node 2;
# 3. fills a volume on A with random data (default 4 GiB), snapshots it, and kills
#    Garage node 3 (SIGKILL) while the snapshot is pending (being uploaded);
# 4. waits for the snapshot to reach `completed` anyway (writes need 2 of 3 nodes);
# 5. on B: waits for `snapshots/<vol>@<label>@<host A>` to be listed, copies its
#    image into volumes/ (a copy by reference, `hydrate = false` so that every read
#    goes to the bucket), and compares the copy's sha256 with A's volume.
#
# Each check prints PASS or FAIL; the exit status is 0 only when all held. Everything
# (mounts, daemons, namespaces, the address on lo, the work directory) is removed on
# exit, also on Ctrl-C.
#
# Environment:
#   GARAGE_BIN   the garage binary (default: `garage` on PATH; tested with 2.5.0)
#   EBSFS_BIN    the ebsfs binary (default: target/release/ebsfs under CARGO_TARGET_DIR
#                or the repo, built with `cargo build --release` when missing)
#   SCALE_SIZE   volume size in MiB (default 4096)
#   SCALE_DIR    parent of the work directory (default /var/tmp); it needs about
#                5 x SCALE_SIZE free (A's volume and snapshot, 3 Garage replicas)
#   SCALE_NET    first two octets of the private addresses used (default 10.213)
#   SCALE_PORT   first of the 9 TCP ports used (default 23900)
#   SCALE_KEEP=1 keep the work directory (logs) after the run
#
#   SCALE_NETNS  auto (default): a network namespace per host if `ip netns` and veth
#                pairs work here, else both daemons in this namespace, said loudly
#                (the namespace check then prints SKIP); on: require them; off: never
#
# Without network namespaces (some containers) the two hosts still have separate
# data directories, host ids, configs and Garage nodes, but share one network stack.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SIZE_MIB=${SCALE_SIZE:-4096}
NET=${SCALE_NET:-10.213}
PORT=${SCALE_PORT:-23900}
S3_ADDR="$NET.0.1"
BUCKET=ebsfs-scale
VOL=scale
LABEL=s1
HOST_A=scale-a
HOST_B=scale-b
KEY_ID=GK0123456789abcdef01234567
KEY_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
RPC_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
T_START=$(date +%s)

log() { printf '%s [scale] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

FAILS=0
CHECKS=0
check() {  # check NAME CONDITION-EXIT-STATUS [DETAIL]
  CHECKS=$((CHECKS + 1))
  if [[ $2 -eq 0 ]]; then
    printf 'PASS  %s%s\n' "$1" "${3:+ ($3)}"
  else
    printf 'FAIL  %s%s\n' "$1" "${3:+ ($3)}"
    FAILS=$((FAILS + 1))
  fi
}

# ------------------------------------------------------------------ prerequisites
[[ $EUID -eq 0 ]] || die "must run as root (network namespaces, FUSE mounts)"
[[ $SIZE_MIB =~ ^[1-9][0-9]*$ ]] || die "SCALE_SIZE must be a number of MiB"
for tool in ip nsenter sha256sum findmnt du; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done
[[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || true
[[ -e /dev/fuse ]] || die "/dev/fuse is missing"

GARAGE=${GARAGE_BIN:-$(command -v garage || true)}
[[ -n $GARAGE && -x $GARAGE ]] || die "no garage binary: set GARAGE_BIN or put garage on PATH (cargo install --locked garage@2.5.0)"

if [[ -n ${EBSFS_BIN:-} ]]; then
  BIN=$EBSFS_BIN
else
  BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/ebsfs"
  if [[ ! -x $BIN ]]; then
    log "building ebsfs (cargo build --release)"
    (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
  fi
fi
[[ -x $BIN ]] || die "ebsfs binary $BIN not found (set EBSFS_BIN)"

PARENT=${SCALE_DIR:-/var/tmp}
mkdir -p "$PARENT"
avail=$(df -B1M --output=avail "$PARENT" | tail -n 1 | tr -d ' ')
need=$((SIZE_MIB * 5 + 2048))
[[ $avail -ge $need ]] || die "needs about $((need / 1024 + 1)) GiB free under $PARENT, only $((avail / 1024)) GiB available"

# ------------------------------------------------------------------ cleanup
WORK=""
declare -a GARAGE_PIDS=()
declare -a EBSFS_PIDS=()
declare -a NETNS=()
LO_ADDR_ADDED=0

proc_alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

stop_pid() {  # stop_pid PID SECONDS: SIGTERM, then SIGKILL after SECONDS
  local pid=$1 i
  proc_alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < $2 * 10; i++)); do proc_alive "$pid" || break; sleep 0.1; done
  proc_alive "$pid" && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? p m n
  set +e
  trap - EXIT INT TERM HUP
  log "cleaning up"
  for p in "${EBSFS_PIDS[@]}"; do stop_pid "$p" 60; done
  if [[ -n $WORK ]]; then
    for m in "$WORK/a/mnt" "$WORK/b/mnt"; do
      findmnt -rn -M "$m" >/dev/null 2>&1 && umount -l "$m"
    done
  fi
  for p in "${GARAGE_PIDS[@]}"; do stop_pid "$p" 10; done
  for n in "${NETNS[@]}"; do ip netns delete "$n" 2>/dev/null; done
  [[ $LO_ADDR_ADDED -eq 1 ]] && ip addr del "$S3_ADDR/32" dev lo 2>/dev/null
  if [[ -n $WORK ]]; then
    if [[ ${SCALE_KEEP:-0} == 1 ]]; then
      log "work directory kept: $WORK"
    elif findmnt -rn -o TARGET | grep -qF "$WORK"; then
      log "something is still mounted under $WORK: not deleting it"
    else
      rm -rf --one-file-system "$WORK"
    fi
  fi
  log "took $(($(date +%s) - T_START)) s"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

WORK=$(mktemp -d "$PARENT/ebsfs-scale.XXXXXX")
log "work directory $WORK; ebsfs $BIN; garage $GARAGE ($("$GARAGE" --version 2>/dev/null | head -n 1))"

# ------------------------------------------------------------------ network
# S3 endpoints listen on $S3_ADDR, an address of lo; each namespace reaches it
# through its veth pair (the root namespace answers for its own addresses on any
# interface).
ip addr add "$S3_ADDR/32" dev lo || die "cannot add $S3_ADDR to lo"
LO_ADDR_ADDED=1
netns_up() {  # netns_up NAME INDEX: false if namespaces or veth pairs do not work here
  local ns=$1 i=$2
  local root="es$$r$i" peer="es$$n$i"
  ip netns add "$ns" 2>/dev/null || return 1
  NETNS+=("$ns")
  ip link add "$root" type veth peer name "$peer" 2>/dev/null || return 1
  ip link set "$peer" netns "$ns"
  ip addr add "$NET.$i.1/30" dev "$root"
  ip link set "$root" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$NET.$i.2/30" dev "$peer"
  ip -n "$ns" link set "$peer" up
  ip -n "$ns" route add default via "$NET.$i.1"
}
NS_A="ebsfs-scale-a-$$"
NS_B="ebsfs-scale-b-$$"
USE_NETNS=1
case ${SCALE_NETNS:-auto} in
  off) USE_NETNS=0 ;;
  on|auto)
    if ! { netns_up "$NS_A" 1 && netns_up "$NS_B" 2; }; then
      [[ ${SCALE_NETNS:-auto} == on ]] && die "network namespaces or veth pairs do not work here (SCALE_NETNS=on)"
      log "NOTE: network namespaces or veth pairs do not work here: both ebsfs daemons run in this namespace"
      for n in "${NETNS[@]}"; do ip netns delete "$n" 2>/dev/null || true; done
      NETNS=()
      USE_NETNS=0
    fi ;;
  *) die "SCALE_NETNS takes auto, on or off" ;;
esac

# ------------------------------------------------------------------ garage
garage_node() {  # garage_node I
  local i=$1 d="$WORK/garage/n$1"
  mkdir -p "$d/meta" "$d/data"
  cat >"$d/garage.toml" <<EOF
metadata_dir = "$d/meta"
data_dir = "$d/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$((PORT + 3 * (i - 1) + 1))"
rpc_public_addr = "127.0.0.1:$((PORT + 3 * (i - 1) + 1))"
rpc_secret = "$RPC_SECRET"

[s3_api]
s3_region = "garage"
api_bind_addr = "$S3_ADDR:$((PORT + 3 * (i - 1)))"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$((PORT + 3 * (i - 1) + 2))"
EOF
  chmod 600 "$d/garage.toml"
  RUST_LOG=${GARAGE_LOG:-warn} setsid "$GARAGE" -c "$d/garage.toml" server </dev/null >"$d/log" 2>&1 &
  GARAGE_PIDS+=($!)
}
g() { "$GARAGE" -c "$WORK/garage/n1/garage.toml" "$@"; }

log "starting 3 Garage nodes"
for i in 1 2 3; do garage_node "$i"; done
declare -a NODE_IDS=()
for i in 1 2 3; do
  id=""
  for _ in $(seq 100); do
    id=$("$GARAGE" -c "$WORK/garage/n$i/garage.toml" node id -q 2>/dev/null) && break
    proc_alive "${GARAGE_PIDS[i - 1]}" || { tail -n 5 "$WORK/garage/n$i/log" >&2; die "garage node $i died"; }
    sleep 0.2
  done
  [[ -n $id ]] || die "garage node $i does not answer"
  NODE_IDS+=("$id")
done
g node connect "${NODE_IDS[1]}" >/dev/null
g node connect "${NODE_IDS[2]}" >/dev/null
for id in "${NODE_IDS[@]}"; do
  g layout assign -z dc1 -c 20G "${id:0:16}" >/dev/null
done
g layout apply --version 1 >/dev/null
g key import --yes -n ebsfs-scale "$KEY_ID" "$KEY_SECRET" >/dev/null
g bucket create "$BUCKET" >/dev/null
g bucket allow --read --write --owner "$BUCKET" --key ebsfs-scale >/dev/null
# Wait until every node knows the layout (a node without it refuses requests).
for _ in $(seq 150); do
  healthy=$(g status 2>/dev/null | grep -c 'HEALTHY\|127.0.0.1' || true)
  [[ $healthy -ge 3 ]] && break
  sleep 0.2
done
nodes=$(g status 2>/dev/null | grep -c '127.0.0.1' || true)
ok=1; [[ $nodes -ge 3 ]] && g bucket info "$BUCKET" >/dev/null 2>&1 && ok=0
check "Garage cluster up: 3 nodes, layout applied, key and bucket made" "$ok" "$nodes nodes in status"

# ------------------------------------------------------------------ ebsfs hosts
host_config() {  # host_config DIR HOST_ID NODE HYDRATE EXTRA
  mkdir -p "$1/data" "$1/mnt"
  cat >"$1/ebsfs.toml" <<EOF
data_dir = "$1/data"
mountpoint = "$1/mnt"
host_id = "$2"
hydrate = $4

[store]
url = "s3://$BUCKET/scale"
endpoint = "http://$S3_ADDR:$((PORT + 3 * ($3 - 1)))"
region = "garage"
path_style = true
poll_seconds = 2
$5
EOF
}
mkdir -p "$WORK/a" "$WORK/b"
cat >"$WORK/a/credentials" <<EOF
[default]
aws_access_key_id = $KEY_ID
aws_secret_access_key = $KEY_SECRET
EOF
chmod 600 "$WORK/a/credentials"
host_config "$WORK/a" "$HOST_A" 1 true "credentials_file = \"$WORK/a/credentials\""
host_config "$WORK/b" "$HOST_B" 2 false ""

start_host() {  # start_host DIR NETNS [VAR=VALUE...]: the daemon runs in NETNS, mounts in ours
  local dir=$1 ns=$2 i
  shift 2
  # nsenter --net changes only the network namespace (ip netns exec would also give
  # the daemon a mount namespace of its own, hiding its mount from this script).
  local -a enter=()
  [[ $USE_NETNS -eq 1 ]] && enter=(nsenter --net="/run/netns/$ns")
  env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_PROFILE "$@" RUST_LOG="${RUST_LOG:-info}" \
    setsid "${enter[@]}" "$BIN" mount --config "$dir/ebsfs.toml" \
    </dev/null >"$dir/ebsfs.log" 2>&1 &
  EBSFS_PIDS+=($!)
  for ((i = 0; i < 600; i++)); do
    if findmnt -rn -M "$dir/mnt" >/dev/null 2>&1 && [[ -d $dir/mnt/volumes ]]; then return 0; fi
    proc_alive "${EBSFS_PIDS[-1]}" || break
    sleep 0.1
  done
  tail -n 20 "$dir/ebsfs.log" >&2
  die "ebsfs in $ns did not mount"
}
# A mounts first: the first mount writes the store's format object (a read, then a
# plain PUT; Garage would ignore If-None-Match anyway).
log "starting ebsfs host A ($HOST_A, namespace $NS_A) and host B ($HOST_B, namespace $NS_B)"
start_host "$WORK/a" "$NS_A"
start_host "$WORK/b" "$NS_B" AWS_ACCESS_KEY_ID="$KEY_ID" AWS_SECRET_ACCESS_KEY="$KEY_SECRET"
A="$WORK/a/mnt"
B="$WORK/b/mnt"
if [[ $USE_NETNS -eq 1 ]]; then
  # The daemons really are in their namespaces, and not in the same one.
  same=0
  for p in "${EBSFS_PIDS[@]}"; do
    [[ $(readlink "/proc/$p/ns/net") == "$(readlink /proc/self/ns/net)" ]] && same=1
  done
  [[ $(readlink "/proc/${EBSFS_PIDS[0]}/ns/net") == "$(readlink "/proc/${EBSFS_PIDS[1]}/ns/net")" ]] && same=1
  check "both hosts mounted, each daemon in its own network namespace" "$same"
else
  printf 'SKIP  %s\n' "each daemon in its own network namespace (both daemons run in this one, SCALE_NETNS or a NOTE above says why)"
  check "both hosts mounted (in this network namespace)" 0
fi

# ------------------------------------------------------------------ fill and snapshot on A
log "filling a $SIZE_MIB MiB volume on A with random data"
truncate -s "${SIZE_MIB}M" "$A/volumes/$VOL.img"
t0=$(date +%s.%N)
dd if=/dev/urandom of="$A/volumes/$VOL.img" bs=1M count="$SIZE_MIB" conv=notrunc,fsync status=none
t1=$(date +%s.%N)
log "filled in $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s; hashing it"
SHA_A=$(sha256sum "$A/volumes/$VOL.img" | awk '{print $1}')
log "A volume sha256 $SHA_A"

SNAP="$A/snapshots/$VOL@$LABEL"
KILL_AT=${SCALE_KILL_AT:-60}
t_snap=$(date +%s)
mkdir "$SNAP"
log "snapshot $VOL@$LABEL started; node 3 is killed when progress reaches $KILL_AT%"
killed=1
killed_at=""
status=""
deadline=$(( $(date +%s) + 1800 + SIZE_MIB ))
while (( $(date +%s) < deadline )); do
  status=$(cat "$SNAP/status" 2>/dev/null || echo "?")
  pct=$(tr -dc '0-9' <"$SNAP/progress" 2>/dev/null || echo 0)
  if [[ $killed -ne 0 && $status == pending && ${pct:-0} -ge $KILL_AT ]]; then
    kill -KILL "${GARAGE_PIDS[2]}"
    wait "${GARAGE_PIDS[2]}" 2>/dev/null || true
    killed=0
    killed_at="$pct% after $(($(date +%s) - t_snap)) s"
    log "killed Garage node 3 (SIGKILL) at $killed_at"
  fi
  [[ $status == pending ]] || break
  sleep 0.2
done
t_done=$(date +%s)
check "a Garage node killed while the snapshot was pending" "$killed" "${killed_at:-the snapshot was not pending at $KILL_AT% or later}"
ok=1; [[ $status == completed ]] && ok=0
check "snapshot completed with one of three Garage nodes down" "$ok" "status $status after $((t_done - t_snap)) s"
info=$(cat "$SNAP/info" 2>/dev/null || true)
ok=1; grep -q 'local+bucket' <<<"$info" && ok=0
check "A's snapshot is in the bucket (info: location local+bucket)" "$ok" "$(grep -m1 location <<<"$info" | tr -s ' ')"

# ------------------------------------------------------------------ on B
REMOTE="$B/snapshots/$VOL@$LABEL@$HOST_A"
t0=$(date +%s)
listed=1
for _ in $(seq 600); do
  [[ -e $REMOTE/volume.img ]] && { listed=0; break; }
  sleep 0.2
done
check "B lists $VOL@$LABEL@$HOST_A" "$listed" "after $(($(date +%s) - t0)) s"
if [[ $listed -eq 0 ]]; then
  sync
  du0=$(du -s -B1 "$WORK/b/data" | cut -f1)
  t0=$(date +%s.%N)
  cp_rc=0
  cp "$REMOTE/volume.img" "$B/volumes/clone.img" || cp_rc=$?
  t1=$(date +%s.%N)
  sync
  du1=$(du -s -B1 "$WORK/b/data" | cut -f1)
  check "cp of the snapshot image into B's volumes/" "$cp_rc" "$(awk "BEGIN{printf \"%.0f ms\", ($t1 - $t0) * 1000}")"
  ok=1; (( du1 - du0 < 64 * 1024 * 1024 )) && ok=0
  check "the copy is by reference (B's data directory grew by less than 64 MiB)" "$ok" "$(( (du1 - du0) / 1024 )) KiB"
  log "hashing B's copy (every block read from the bucket through node 2)"
  t0=$(date +%s.%N)
  SHA_B=$(sha256sum "$B/volumes/clone.img" | awk '{print $1}')
  t1=$(date +%s.%N)
  ok=1; [[ $SHA_B == "$SHA_A" ]] && ok=0
  check "sha256 of B's copy = sha256 of A's volume" "$ok" "$SHA_B, read in $(awk "BEGIN{printf \"%.1f s\", $t1 - $t0}")"
fi

for p in "${EBSFS_PIDS[@]}"; do
  proc_alive "$p" || { check "ebsfs daemons alive at the end" 1 "pid $p exited"; break; }
done

echo "$((CHECKS - FAILS)) of $CHECKS checks passed in $(($(date +%s) - T_START)) s"
[[ $FAILS -eq 0 ]]

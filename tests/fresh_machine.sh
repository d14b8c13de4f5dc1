#!/usr/bin/env bash
# Check README commands (a) and (b) on a fresh Debian 12, the way a new user meets them.
#
#   bash tests/fresh_machine.sh [--no-tests] [--keep] [--root DIR] [--repo DIR] [--mirror URL] [COMMIT]
#
# Not part of the pytest suite (it takes a Debian mirror, PyPI, root and many minutes). What it does:
#
#  1. makes a fresh root with `mmdebstrap --variant=minbase --include=ca-certificates,git,python3 bookworm`:
#     a Debian 12 with git and python3 and nothing else;
#  2. clones the repository into it at /root/enclaver and checks out COMMIT (default: HEAD of the
#     repository this script sits in, or of --repo). A clean clone: uncommitted work is NOT tested.
#     The clone's `origin` is the source's own `origin` URL, or none, never a path on this host;
#  3. mounts what a real machine has: the root itself (bound onto itself: / must be a mount point
#     for dockerd and `unshare --mount`), /proc, /sys (recursively: the host's cgroup hierarchy comes
#     with it, which dockerd needs; cgroup2 is mounted if the host has none at /sys/fs/cgroup),
#     /dev (recursively: /dev/pts, /dev/shm), all shared as under systemd (dockerd needs that in a
#     chroot, see below); and gives it this host's network settings: a copy of
#     /etc/resolv.conf, the proxy variables, and the CA certificates this host trusts that Debian does
#     not ship (a TLS-intercepting proxy's, say: without them pip cannot reach PyPI), installed
#     in the root's /usr/local/share/ca-certificates, with PIP_CERT pointing pip at the system bundle;
#  4. runs, in the chroot, as root, with a clean environment, in /root/enclaver:
#     - README (a), taken verbatim from README.md's (a) code block (so this script cannot drift
#       from the README), and times it;
#     - README (a) again: it must be a fast no-op (no build step re-runs) that still prints the
#       PCRs and where the measurements and the KMS key policy are; its time is printed;
#     - README (b), also verbatim from README.md (`bash .ci/run`: system packages, a virtualenv,
#       the whole suite), unless --no-tests.
#
# Options:
#   --no-tests     run (a) twice only, not (b)        (default: (b) runs too; it takes many minutes)
#   --keep         keep the root afterwards, for inspection (it is always unmounted)
#   --root DIR     where to make the root; DIR must not exist   (default: a new directory under
#                  ${TMPDIR:-/var/tmp}, on disk: the suite's Docker engine needs gigabytes)
#   --repo DIR     the repository to clone                      (default: the one holding this script)
#   --mirror URL   the Debian mirror for mmdebstrap             (default: mmdebstrap's, deb.debian.org)
#   --host-cas F   the CA bundle whose extra certificates the root gets (default: /etc/ssl/certs/ca-certificates.crt)
#   --no-host-cas  give the root no CA of this host: Debian's bundle only
#   COMMIT         any revision of --repo                       (default: HEAD)
#
# Needs root, mmdebstrap, git and unshare on the host. All mounts are made in a private mount
# namespace (the script re-runs itself under `unshare --mount`), so none is ever visible on the
# host, and on exit, success or failure, a trap stops every process left in the root and unmounts
# everything below it. Exit status: 0 when every step passed; otherwise non-zero, after a line
# "fresh_machine.sh: FAILED at step: ..." naming the step.
set -euo pipefail

PROG=fresh_machine.sh
SUITE=bookworm
WITH_TESTS=1
KEEP=0
ROOT=""
REPO=""
MIRROR=""
COMMIT=HEAD
STEP="reading the options"
FAILED_CHECKS=()
HOST_CAS=1
HOST_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
ROOT_ENV=()
WORK=""
CREATED=0

usage() { sed -n '2,/^set -euo pipefail/{/^set /d;s/^# \{0,1\}//;p}' "$0"; }
die() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 1; }  # the EXIT trap then names the step
step() { STEP="$*"; printf '\n==> %s\n' "$*"; }
# Run a long command in the background and wait for it: bash runs a trap for SIGTERM/SIGINT only
# after a foreground command ends, but interrupts `wait` at once, so the cleanup starts right away.
run() { "$@" & wait $!; }
# Run "$@" with its output also copied to the file $LOG; its exit status is the command's.
run_logged() {
  local status=0 fd tee_pid
  exec {fd}> >(tee "$LOG")
  tee_pid=$!
  run "$@" >&"$fd" 2>&1 || status=$?
  exec {fd}>&-
  wait "$tee_pid" 2>/dev/null || true  # the log is complete once tee has ended
  return "$status"
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- cleanup: stop what runs in the root, unmount everything below it, remove it unless --keep ---
mounts_below() { findmnt -rn -o TARGET | awk -v r="$ROOT" 'index($0, r "/") == 1 || $0 == r' | sort -r; }
procs_in_root() {
  local p link
  for p in /proc/[0-9]*; do
    link=$(readlink "$p/root" 2>/dev/null) || continue
    if [ "$link" = "$ROOT" ] || [ "${link#"$ROOT"/}" != "$link" ]; then echo "${p#/proc/}"; fi
  done
}
cleanup() {
  local status=$? pids=() target left
  trap - EXIT INT TERM HUP
  set +e
  [ -z "$WORK" ] || rm -rf "$WORK"
  if [ "$CREATED" = 1 ]; then
    mapfile -t pids < <(procs_in_root)
    if [ ${#pids[@]} -gt 0 ]; then
      echo "cleanup: stopping processes left in the root: ${pids[*]}"
      kill -TERM "${pids[@]}" 2>/dev/null
      for _ in 1 2 3 4 5 6 7 8 9 10; do mapfile -t pids < <(procs_in_root); [ ${#pids[@]} -eq 0 ] && break; sleep 1; done
      [ ${#pids[@]} -eq 0 ] || { kill -KILL "${pids[@]}" 2>/dev/null; sleep 1; }
    fi
    for target in $(mounts_below); do
      umount "$target" 2>/dev/null || umount -l "$target" || echo "cleanup: cannot unmount $target" >&2
    done
    left=$(mounts_below)
    if [ -n "$left" ]; then
      echo "cleanup: still mounted (in this script's private namespace only; it ends with it): $left" >&2
      [ $status -ne 0 ] || status=1
    elif [ "$KEEP" = 1 ]; then
      echo "kept the root: $ROOT (nothing mounted; remove it with: rm -rf --one-file-system $ROOT)"
    else
      rm -rf --one-file-system "$ROOT" || echo "cleanup: cannot remove $ROOT" >&2
    fi
  fi
  if [ $status -ne 0 ]; then
    printf '\n%s: FAILED at step: %s (exit %s)\n' "$PROG" "$STEP" "$status" >&2
  fi
  exit $status
}
trap cleanup EXIT
trap 'STEP="$STEP (interrupted: SIGINT)"; exit 130' INT
trap 'STEP="$STEP (interrupted: SIGTERM)"; exit 143' TERM
trap 'STEP="$STEP (interrupted: SIGHUP)"; exit 129' HUP

while [ $# -gt 0 ]; do
  case $1 in
    --no-tests) WITH_TESTS=0 ;;
    --with-tests) WITH_TESTS=1 ;;
    --keep) KEEP=1 ;;
    --no-host-cas) HOST_CAS=0 ;;
    --host-cas) [ $# -ge 2 ] || die "--host-cas needs a file"; HOST_CA_BUNDLE=$2; shift ;;
    --host-cas=*) HOST_CA_BUNDLE=${1#--host-cas=} ;;
    --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift ;;
    --root=*) ROOT=${1#--root=} ;;
    --repo) [ $# -ge 2 ] || die "--repo needs a directory"; REPO=$2; shift ;;
    --repo=*) REPO=${1#--repo=} ;;
    --mirror) [ $# -ge 2 ] || die "--mirror needs a URL"; MIRROR=$2; shift ;;
    --mirror=*) MIRROR=${1#--mirror=} ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) COMMIT=$1 ;;
  esac
  shift
done

[ "$(id -u)" = 0 ] || die "run as root: mmdebstrap, mount and chroot need it"
for tool in mmdebstrap git unshare chroot mount umount findmnt; do
  command -v "$tool" >/dev/null || die "$tool is missing on this host (apt-get install mmdebstrap git util-linux mount)"
done

# Everything below runs in a private mount namespace: a mount made here is never seen by the host,
# and disappears with the namespace even if this script is killed before its trap can run.
if [ -z "${ENCLAVER_FRESH_MACHINE_NS:-}" ]; then
  args=()
  [ "$WITH_TESTS" = 1 ] || args+=(--no-tests)
  [ "$KEEP" = 0 ] || args+=(--keep)
  [ "$HOST_CAS" = 1 ] || args+=(--no-host-cas)
  args+=(--host-cas "$HOST_CA_BUNDLE")
  [ -z "$ROOT" ] || args+=(--root "$ROOT")
  [ -z "$REPO" ] || args+=(--repo "$REPO")
  [ -z "$MIRROR" ] || args+=(--mirror "$MIRROR")
  ENCLAVER_FRESH_MACHINE_NS=1 exec unshare --mount --propagation private -- bash "$0" "${args[@]}" "$COMMIT"
fi

STEP="finding the repository and the commit"
[ -n "$REPO" ] || REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel) \
  || die "$(dirname "$0") is not in a git repository: give --repo"
REPO=$(git -C "$REPO" rev-parse --show-toplevel) || die "$REPO is not a git repository"
SHA=$(git -C "$REPO" rev-parse --verify --quiet "$COMMIT^{commit}") || die "$COMMIT is not a commit of $REPO"
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]; then
  echo "note: $REPO has uncommitted changes; they are not tested (the root gets a clean clone of $SHA)"
fi

if [ -z "$ROOT" ]; then
  ROOT=$(mktemp -d "${TMPDIR:-/var/tmp}/enclaver-fresh.XXXXXX") || die "cannot make a directory under ${TMPDIR:-/var/tmp}"
  rmdir "$ROOT"  # mmdebstrap makes it
else
  if [ -e "$ROOT" ] || [ -L "$ROOT" ]; then die "--root $ROOT exists: give a path that does not, so nothing of yours is overwritten or removed"; fi
fi
mkdir -p "$(dirname "$ROOT")"
ROOT=$(realpath -m "$ROOT")
[ "$ROOT" != / ] || die "the root cannot be /"
CLONE=/root/enclaver

# --- the README's commands, verbatim ---
readme_block() {  # the first ```sh block after the paragraph that starts with **(LETTER)
  awk -v mark="**($1)" '
    index($0, mark) == 1 { seen = 1; next }
    seen && !inside && /^```sh[ \t]*$/ { inside = 1; next }
    inside && /^```[ \t]*$/ { exit }
    inside { print }
  ' "$2"
}
STEP="reading README (a) and (b)"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/enclaver-fresh-work.XXXXXX")
git -C "$REPO" show "$SHA:README.md" > "$WORK/README.md" || die "cannot read README.md at $SHA"
CMD_A=$(readme_block a "$WORK/README.md")
CMD_B=$(readme_block b "$WORK/README.md")
[ -n "$CMD_A" ] || die "README.md at $SHA has no \`\`\`sh block after its **(a) paragraph"
[ -n "$CMD_B" ] || die "README.md at $SHA has no \`\`\`sh block after its **(b) paragraph"
printf 'README (a): %s\nREADME (b): %s\n' "$CMD_A" "$CMD_B"

# --- the fresh root ---
step "fresh root: mmdebstrap --variant=minbase --include=ca-certificates,git,python3 $SUITE $ROOT"
CREATED=1
t=$(now)
run mmdebstrap --quiet --variant=minbase --include=ca-certificates,git,python3 "$SUITE" "$ROOT" ${MIRROR:+"$MIRROR"} \
  || die "mmdebstrap failed (is the Debian mirror reachable?)"
echo "made in $(since "$t") s"

step "clone $SHA into the root at $CLONE"
git clone --quiet --no-checkout --no-hardlinks "$REPO" "$ROOT$CLONE" || die "git clone $REPO"
git -C "$ROOT$CLONE" checkout --quiet --detach "$SHA" || die "git checkout $SHA"
origin=$(git -C "$REPO" config --get remote.origin.url || true)
if [ -n "$origin" ]; then
  git -C "$ROOT$CLONE" remote set-url origin "$origin"
else
  git -C "$ROOT$CLONE" remote remove origin  # a path on this host is not what a user's clone has
fi
git -C "$ROOT$CLONE" log -1 --format='%h %s'

step "mount /proc, /sys, /dev in the root; copy /etc/resolv.conf"
# The root must itself be a mount point, as / is on a real machine: dockerd (applying a layer) and
# unshare --mount make / private, and fail with EINVAL ("remount /, flags: 0x84000") otherwise.
mount --bind "$ROOT" "$ROOT" || die "mount --bind $ROOT $ROOT"
mount -t proc proc "$ROOT/proc" || die "mount proc"
mount --rbind /sys "$ROOT/sys" || die "mount --rbind /sys"
if ! findmnt -rn "$ROOT/sys/fs/cgroup" >/dev/null; then
  mount -t cgroup2 cgroup2 "$ROOT/sys/fs/cgroup" || die "mount cgroup2 on /sys/fs/cgroup (dockerd needs a cgroup hierarchy)"
fi
mount --rbind /dev "$ROOT/dev" || die "mount --rbind /dev"
# Shared, as systemd makes every mount on a real machine (in this namespace only: its mounts are
# private copies, so nothing propagates to the host). On a private mount dockerd bind-mounts its
# data root onto itself, and in a chroot it cannot recognise that mount at shutdown (its root in
# mountinfo is the host's path) and leaves it behind: "Device or resource busy" removing data/.
mount --make-rshared "$ROOT" || die "mount --make-rshared $ROOT"
# a copy, not a bind mount: the root's /etc/resolv.conf may be a symlink, which a bind would follow on the host
rm -f "$ROOT/etc/resolv.conf"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" || die "copy /etc/resolv.conf"
# CAs this host trusts beyond the ones Debian ships (a TLS-intercepting proxy's, say): without them
# nothing in the root reaches PyPI from this network. They go where a local admin would put them.
if [ "$HOST_CAS" = 1 ] && [ -s "$HOST_CA_BUNDLE" ]; then
  # Debian's own CAs: the root's bundle, and this host's ca-certificates package (it may be older)
  for f in "$ROOT/etc/ssl/certs/ca-certificates.crt" /usr/share/ca-certificates/*/*.crt; do
    [ ! -f "$f" ] || { cat "$f"; echo; }
  done > "$WORK/debian-cas.pem"
  mkdir -p "$ROOT/usr/local/share/ca-certificates/fresh-machine-host"
  awk -v known="$WORK/debian-cas.pem" -v out="$ROOT/usr/local/share/ca-certificates/fresh-machine-host" '
    function blocks(file, into,   line, pem, n) {
      while ((getline line < file) > 0) {
        sub(/\r$/, "", line)
        if (line ~ /-----BEGIN CERTIFICATE-----/) pem = ""
        pem = pem line "\n"
        if (line ~ /-----END CERTIFICATE-----/) into[++n] = pem
      }
      close(file)
      return n
    }
    BEGIN {
      blocks(known, root); for (i in root) have[root[i]] = 1
      n = blocks(ARGV[1], host); extra = 0
      for (i = 1; i <= n; i++) if (!(host[i] in have)) { f = out "/host-" (++extra) ".crt"; printf "%s", host[i] > f; close(f) }
      print extra
      exit
    }' "$HOST_CA_BUNDLE" > "$WORK/extra-cas" || die "reading $HOST_CA_BUNDLE"
  if [ "$(cat "$WORK/extra-cas")" -gt 0 ]; then
    out=$(chroot "$ROOT" /usr/sbin/update-ca-certificates 2>&1) || { printf '%s\n' "$out"; die "update-ca-certificates in the root"; }
    echo "added $(cat "$WORK/extra-cas") CA certificate(s) of this host's $HOST_CA_BUNDLE that Debian does not ship (--no-host-cas: none)"
    # pip's own CA bundle (certifi, once .ci/run upgrades pip) knows none of them: point it at the system's
    ROOT_ENV+=(PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
  else
    rmdir "$ROOT/usr/local/share/ca-certificates/fresh-machine-host"
  fi
fi
[ -s "$ROOT/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOT/etc/hosts"
findmnt -rn -o TARGET | awk -v r="$ROOT" 'index($0, r "/") == 1' | wc -l | xargs printf '%s mounts below the root\n'

# A root login's environment, nothing of this host's (its pip or apt settings, a virtualenv);
# proxy variables pass through, since a real machine would have them too.
in_root() {
  local env=("${ROOT_ENV[@]}" HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM="${TERM:-dumb}"
             PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
  local v
  for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [ -z "${!v:-}" ] || env+=("$v=${!v}")
  done
  run chroot "$ROOT" /usr/bin/env -i "${env[@]}" /bin/sh -ec "cd $CLONE && $1" </dev/null
}

step "README (a), first run"
t=$(now)
in_root "$CMD_A" || die "README (a) failed on a fresh machine (output above)"
A1=$(since "$t")
echo "README (a), first run: ${A1} s"

step "README (a), second run: must rebuild nothing and still say where the PCRs and the policy are"
t=$(now)
status=0
LOG=$WORK/a2.log run_logged in_root "$CMD_A" || status=$?
A2=$(since "$t")
[ "$status" = 0 ] || die "README (a) failed when run a second time (exit $status; output above)"
echo "README (a), second run: ${A2} s"
# doit prints ". task" for a task it runs and "-- task" for one that is up to date
rebuilt=$(grep -E '^\. +(odyn_image|runtime_image|examples:|layer:|eif:|release:)' "$WORK/a2.log" || true)
[ -z "$rebuilt" ] || FAILED_CHECKS+=("the second (a) is not a no-op, it ran: $(tr '\n' ' ' <<<"$rebuilt")")
for what in PCR0 PCR1 PCR2 measurements.json kms-policy.json; do
  grep -q -- "$what" "$WORK/a2.log" || FAILED_CHECKS+=("the second (a) does not print $what")
done
for check in "${FAILED_CHECKS[@]}"; do echo "CHECK FAILED: $check" >&2; done

if [ "$WITH_TESTS" = 1 ]; then
  step "README (b): the whole suite"
  t=$(now)
  status=0
  LOG=$WORK/b.log run_logged in_root "$CMD_B" || status=$?
  B=$(since "$t")
  pytest_line=$(grep -E '^=+ .* in [0-9.]+s' "$WORK/b.log" | tail -1 || true)
  echo "README (b): ${B} s; pytest: ${pytest_line:-no summary line}"
  [ "$status" = 0 ] || die "README (b) failed (exit $status; output above)"
fi

STEP="the second run of (a)"
[ ${#FAILED_CHECKS[@]} -eq 0 ] || die "$(printf '%s; ' "${FAILED_CHECKS[@]}")"
STEP=""
printf '\n%s: passed on a fresh %s root, commit %s: (a) %s s, (a) again %s s%s\n' "$PROG" "$SUITE" "$SHA" \
  "$A1" "$A2" "$([ "$WITH_TESTS" = 1 ] && echo ", (b) $B s" || echo "; (b) not run (--no-tests)")"

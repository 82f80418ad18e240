#!/usr/bin/env bash
# Build (or reuse) the keyslot-trace test kernel.
#
#   tests/vm/build-kernel.sh            # prints progress on stderr, bzImage path on stdout
#   KERNEL=$(tests/vm/build-kernel.sh)  # the last (only) stdout line is the image path
#
# Source: Debian's linux-source-6.1 (/usr/src/linux-source-6.1.tar.xz), configured as
# `make allnoconfig` + tests/vm/kernel.config, then `make olddefconfig`. Every option
# the fragment sets must survive olddefconfig, or the build stops and lists the ones
# that were dropped.
#
# Result, outside the repo:
#   ${KEYSLOT_TRACE_CACHE:-$HOME/.cache/keyslot-trace}/kernel-<key>/
#     bzImage         the kernel image (written last: its presence means "done")
#     build/          the configured, fully built kernel tree (for out-of-tree modules:
#                     make -C .../build M=$PWD)
#     modroot/        `make modules_install` output (lib/modules/<release>/)
#     build.log       full make output
#     kernelrelease, config
# <key> = <linux-source-6.1 package version>-<sha256(version, kernel.config, this script)[:16]>
#
# Env: KEYSLOT_TRACE_CACHE (cache root), JOBS (make -j, default: nproc),
#      KEYSLOT_TRACE_NO_APT=1 (never call apt-get; fail if something is missing).
set -euo pipefail

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT_PATH")
FRAGMENT="$SCRIPT_DIR/kernel.config"
SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
CACHE_ROOT=${KEYSLOT_TRACE_CACHE:-${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}/.cache/keyslot-trace}
JOBS=${JOBS:-$(nproc)}
START=$(date +%s)

log() { printf '[build-kernel %4ds] %s\n' "$(( $(date +%s) - START ))" "$*" >&2; }
die() { printf 'build-kernel: ERROR: %s\n' "$*" >&2; exit 1; }

[[ -f $FRAGMENT ]] || die "missing config fragment $FRAGMENT"

# ---------------------------------------------------------------------------
# 1. dependencies (Debian bookworm, as root)
# ---------------------------------------------------------------------------
NEEDED_PKGS=("$SRC_PKG" build-essential flex bison bc libelf-dev libssl-dev dwarves cpio kmod xz-utils)
missing=()
for p in "${NEEDED_PKGS[@]}"; do
    if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    [[ ${KEYSLOT_TRACE_NO_APT:-0} == 1 ]] && die "missing packages: ${missing[*]}"
    [[ $(id -u) == 0 ]] || die "missing packages (${missing[*]}); run as root or install them"
    log "stage: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
[[ -f $SRC_TARBALL ]] || die "$SRC_TARBALL not found although $SRC_PKG is installed"

# ---------------------------------------------------------------------------
# 2. cache key
# ---------------------------------------------------------------------------
SRC_VERSION=$(dpkg-query -W -f='${Version}' "$SRC_PKG")
HASH=$( { printf '%s\n' "$SRC_VERSION"; sha256sum <"$FRAGMENT"; sha256sum <"$SCRIPT_PATH"; } \
        | sha256sum | cut -c1-16)
KEY="${SRC_VERSION}-${HASH}"
OUT="$CACHE_ROOT/kernel-$KEY"
IMAGE="$OUT/bzImage"

if [[ -f $IMAGE ]]; then
    log "cached: $OUT"
    echo "$IMAGE"
    exit 0
fi

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock -n 9 || { log "another build holds $OUT/.lock; waiting"; flock 9; }
if [[ -f $IMAGE ]]; then   # finished by whoever held the lock
    echo "$IMAGE"
    exit 0
fi
log "building kernel $KEY into $OUT (make -j$JOBS)"

BUILD="$OUT/build"
LOGF="$OUT/build.log"
MAKE=(make -C "$BUILD" ARCH=x86_64 -j"$JOBS")

# ---------------------------------------------------------------------------
# 3. unpack (resumable: the marker is written only after tar succeeded)
# ---------------------------------------------------------------------------
if [[ ! -f $OUT/.unpacked ]]; then
    log "stage: unpack $SRC_TARBALL"
    rm -rf "$BUILD"
    mkdir -p "$BUILD"
    tar -xf "$SRC_TARBALL" -C "$BUILD" --strip-components=1
    touch "$OUT/.unpacked"
fi

# ---------------------------------------------------------------------------
# 4. configure + verify
# ---------------------------------------------------------------------------
log "stage: configure (allnoconfig + $(basename "$FRAGMENT"), olddefconfig)"
: >"$LOGF"
"${MAKE[@]}" KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig >>"$LOGF" 2>&1 \
    || die "allnoconfig failed; see $LOGF"
"${MAKE[@]}" olddefconfig >>"$LOGF" 2>&1 || die "olddefconfig failed; see $LOGF"

dropped=()
while IFS= read -r line; do
    line=${line%%#*}                       # (fragment lines carry no trailing comments)
    line=$(echo "$line" | tr -d '[:space:]')
    [[ $line =~ ^CONFIG_[A-Za-z0-9_]+= ]] || continue
    grep -qxF "$line" "$BUILD/.config" || dropped+=("$line  (got: $(grep -E "^(# )?${line%%=*}[= ]" "$BUILD/.config" || echo 'absent'))")
done <"$FRAGMENT"
while IFS= read -r name; do                # "# CONFIG_FOO is not set" lines in the fragment
    grep -qE "^${name}=[ym]" "$BUILD/.config" && dropped+=("# $name is not set  (got: enabled)")
done < <(sed -nE 's/^# (CONFIG_[A-Za-z0-9_]+) is not set$/\1/p' "$FRAGMENT")
if ((${#dropped[@]})); then
    printf 'build-kernel: ERROR: %d option(s) from %s did not survive olddefconfig:\n' \
        "${#dropped[@]}" "$FRAGMENT" >&2
    printf '  %s\n' "${dropped[@]}" >&2
    printf 'Fix their dependencies in the fragment.\n' >&2
    exit 1
fi
log "config ok: all $(grep -cE '^CONFIG_' "$FRAGMENT") fragment options set; $(grep -cE '=y$' "$BUILD/.config") options =y in total"

# ---------------------------------------------------------------------------
# 5. build (make output goes to build.log; a heartbeat goes to stderr)
# ---------------------------------------------------------------------------
run_make() {  # run_make STAGE TARGET...
    local stage=$1; shift
    log "stage: $stage (log: $LOGF)"
    "${MAKE[@]}" "$@" >>"$LOGF" 2>&1 &
    local pid=$! rc=0 last=0
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5
        if (( $(date +%s) - last >= 30 )); then
            last=$(date +%s)
            kill -0 "$pid" 2>/dev/null \
                && log "still building… $(grep -cE '^  (CC|AS)( \[M\])? ' "$LOGF" || true) files compiled"
        fi
    done
    wait "$pid" || rc=$?
    if ((rc)); then
        printf 'build-kernel: ERROR: %s failed (exit %d); last lines of %s:\n' "$stage" "$rc" "$LOGF" >&2
        grep -E 'error|Error' "$LOGF" | tail -n 20 >&2 || true
        tail -n 30 "$LOGF" >&2
        exit 1
    fi
}

run_make "make bzImage modules" bzImage modules
RELEASE=$("${MAKE[@]}" -s kernelrelease)
rm -rf "$OUT/modroot"
run_make "make modules_install" INSTALL_MOD_PATH="$OUT/modroot" modules_install

echo "$RELEASE" >"$OUT/kernelrelease"
cp "$BUILD/.config" "$OUT/config"
cp "$BUILD/arch/x86/boot/bzImage" "$IMAGE.tmp"
mv "$IMAGE.tmp" "$IMAGE"
log "done: $RELEASE, bzImage $(stat -c %s "$IMAGE") bytes, $(( $(date +%s) - START ))s total"
echo "$IMAGE"

#!/usr/bin/env bash
# Build (or reuse) a keyslot-trace test kernel, one per keyslot-manager generation.
#
#   tests/vm/build-kernel.sh [GEN]            # progress on stderr, bzImage path on stdout
#   KERNEL=$(tests/vm/build-kernel.sh 5.10)   # the last (only) stdout line is the image path
#
# GEN (default 6.1):
#   5.10   linux-source-5.10, Debian bullseye-security   blk_ksm_* (5.8-5.15), kprobes only
#   6.1    linux-source-6.1,  Debian bookworm            blk_crypto_* with the May-2023 backports
#   6.12   linux-source-6.12, Debian bookworm-backports  blk_crypto_*, post-6.4 mainline
#
# Source: the linux-source-GEN package, fetched with `apt-get download` through a private
# sources list built from the mirrors this machine's apt already uses (the system's apt
# configuration is never changed), kept in the cache. Configured as `make allnoconfig`
# with tests/vm/kernel.config + tests/vm/kernel-GEN.config, then `make olddefconfig`;
# every option the fragments set must survive, or the build stops and lists the dropped ones.
#
# Result, outside the repo:
#   ${KEYSLOT_TRACE_CACHE:-$HOME/.cache/keyslot-trace}/kernel-<GEN>-<key>/
#     bzImage         the kernel image (written last: its presence means "done")
#     build/          the configured, fully built kernel tree (out-of-tree modules:
#                     make -C .../build M=$PWD)
#     modroot/        `make modules_install` output (lib/modules/<release>/)
#     build.log       full make output
#     kernelrelease, config, generation, source-version
# <key> = <package version>-<sha256(version, both fragments, this script)[:16]>.
#
# Compiler output is cached with ccache (<cache>/ccache), so a changed fragment or
# script rebuilds quickly; a fresh machine builds from scratch.
#
# Env: KEYSLOT_TRACE_CACHE (cache root), JOBS (make -j, default: nproc),
#      KEYSLOT_TRACE_NO_APT=1 (never call apt-get: use what is installed and cached).
set -euo pipefail

GEN=${1:-6.1}
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT_PATH")
COMMON_FRAGMENT="$SCRIPT_DIR/kernel.config"
GEN_FRAGMENT="$SCRIPT_DIR/kernel-$GEN.config"
SRC_PKG=linux-source-$GEN
CACHE_ROOT=${KEYSLOT_TRACE_CACHE:-${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}/.cache/keyslot-trace}
JOBS=${JOBS:-$(nproc)}
START=$(date +%s)
# The kernel's build must not depend on whatever a session put on PATH (a rustc
# there changes the generated config, for one).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '[build-kernel %s %4ds] %s\n' "$GEN" "$(( $(date +%s) - START ))" "$*" >&2; }
die() { printf 'build-kernel %s: ERROR: %s\n' "$GEN" "$*" >&2; exit 1; }

case $GEN in
    5.10 | 6.1 | 6.12) ;;
    *) die "unknown generation '$GEN' (one of: 5.10 6.1 6.12)" ;;
esac
[[ -f $COMMON_FRAGMENT ]] || die "missing config fragment $COMMON_FRAGMENT"
[[ -f $GEN_FRAGMENT ]] || die "missing config fragment $GEN_FRAGMENT"

# ---------------------------------------------------------------------------
# 1. build dependencies (Debian bookworm, as root)
# ---------------------------------------------------------------------------
NEEDED_PKGS=(build-essential flex bison bc libelf-dev libssl-dev dwarves cpio kmod xz-utils ccache)
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

# ---------------------------------------------------------------------------
# 2. the source package, through a private apt sources list
# ---------------------------------------------------------------------------
# The mirrors come from the machine's own apt sources (deb822 *.sources and one-line
# *.list files): the URI serving a "-security" suite is the security archive, the
# URI serving the machine's codename is the main archive. Nothing is hard-coded.
APT_DIR="$CACHE_ROOT/apt"
SRC_DIR="$CACHE_ROOT/sources"
mkdir -p "$APT_DIR/lists/partial" "$SRC_DIR"

machine_sources() {  # prints "URI SUITE" for every enabled deb source
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        sed -E 's/#.*//; s/\[[^]]*\]//' "$f" | awk '$1 == "deb" && NF >= 3 { print $2, $3 }'
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk 'function flush() { if (deb && enabled) for (u in uris) for (s in suites) print uris[u], suites[s];
                                deb = 0; enabled = 1; delete uris; delete suites }
             BEGIN { enabled = 1 }
             /^[ \t]*#/ { next }
             /^[ \t]*$/ { flush(); next }
             tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
             tolower($1) == "enabled:" { enabled = (tolower($2) != "no") }
             tolower($1) == "uris:" { for (i = 2; i <= NF; i++) uris[i] = $i }
             tolower($1) == "suites:" { for (i = 2; i <= NF; i++) suites[i] = $i }
             END { flush() }' "$f"
    done
}

fetch_source() {  # sets SRC_VERSION and SRC_TARBALL; downloads if need be
    local codename main_uri sec_uri list="$APT_DIR/sources.list"
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    main_uri=$(machine_sources | awk -v c="$codename" '$2 == c { print $1; exit }')
    sec_uri=$(machine_sources | awk '$2 ~ /-security$/ { print $1; exit }')
    [[ -n $main_uri ]] || die "no apt source for '$codename' in /etc/apt: cannot find a Debian mirror"
    [[ -n $sec_uri ]] || sec_uri=${main_uri%/}-security
    local kr=/usr/share/keyrings/debian-archive-keyring.gpg
    {
        echo "deb [signed-by=$kr] $main_uri $codename main"
        echo "deb [signed-by=$kr] $main_uri $codename-backports main"
        echo "deb [signed-by=$kr] $sec_uri $codename-security main"
        echo "deb [signed-by=$kr] $sec_uri bullseye-security main"
    } >"$list"
    local apt_opts=(-o Dir::Etc::sourcelist="$list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$APT_DIR/lists"
                    -o APT::Get::List-Cleanup=0 -o Debug::NoLocking=1)
    SRC_VERSION=""
    if [[ ${KEYSLOT_TRACE_NO_APT:-0} != 1 ]] && apt-get -qq "${apt_opts[@]}" update >"$APT_DIR/update.log" 2>&1; then
        SRC_VERSION=$(apt-cache "${apt_opts[@]}" policy "$SRC_PKG" | awk '/Candidate:/ { print $2 }')
        [[ -n $SRC_VERSION && $SRC_VERSION != "(none)" ]] \
            || die "$SRC_PKG is not served by $main_uri or $sec_uri (sources list: $list)"
    else
        # offline: the newest source of this generation already in the cache
        SRC_VERSION=$(ls "$SRC_DIR" | sed -nE "s/^$SRC_PKG-(.*)\.tar\.xz$/\1/p" | sort -V | tail -n1)
        [[ -n $SRC_VERSION ]] || die "apt-get update failed (see $APT_DIR/update.log) and no $SRC_PKG is cached"
        log "apt unavailable; using the cached $SRC_PKG $SRC_VERSION"
    fi
    SRC_TARBALL="$SRC_DIR/$SRC_PKG-$SRC_VERSION.tar.xz"
    [[ -f $SRC_TARBALL ]] && return
    log "stage: download $SRC_PKG $SRC_VERSION"
    local dl
    dl=$(mktemp -d "$SRC_DIR/dl.XXXXXX")
    # the download runs unsandboxed: _apt cannot write into a root-owned cache
    (cd "$dl" && apt-get -qq "${apt_opts[@]}" -o APT::Sandbox::User=root download "$SRC_PKG=$SRC_VERSION") >&2 \
        || die "apt-get download $SRC_PKG=$SRC_VERSION failed"
    dpkg-deb --fsys-tarfile "$dl"/*.deb | tar -xO "./usr/src/$SRC_PKG.tar.xz" >"$SRC_TARBALL.tmp" \
        || die "no /usr/src/$SRC_PKG.tar.xz in the package"
    mv "$SRC_TARBALL.tmp" "$SRC_TARBALL"
    rm -rf "$dl"
}
fetch_source

# ---------------------------------------------------------------------------
# 3. cache key
# ---------------------------------------------------------------------------
HASH=$( { printf '%s\n' "$GEN" "$SRC_VERSION"; sha256sum <"$COMMON_FRAGMENT"; sha256sum <"$GEN_FRAGMENT";
          sha256sum <"$SCRIPT_PATH"; } | sha256sum | cut -c1-16)
KEY="${SRC_VERSION}-${HASH}"
OUT="$CACHE_ROOT/kernel-$GEN-$KEY"
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
log "building kernel $GEN $KEY into $OUT (make -j$JOBS)"

BUILD="$OUT/build"
LOGF="$OUT/build.log"
FRAGMENT="$OUT/fragment.config"
# NOHASHDIR: each key builds in its own directory; debug info keeps the first one's paths
export CCACHE_DIR="$CACHE_ROOT/ccache" CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-8G} CCACHE_BASEDIR="$BUILD" CCACHE_NOHASHDIR=1
# fixed build identity: the same sources and config give the same objects (and ccache hits)
export KBUILD_BUILD_TIMESTAMP="@0" KBUILD_BUILD_USER=keyslot-trace KBUILD_BUILD_HOST=test-vm
MAKE=(make -C "$BUILD" ARCH=x86_64 CC="ccache gcc" HOSTCC="ccache gcc" -j"$JOBS")

# ---------------------------------------------------------------------------
# 4. unpack (resumable: the marker is written only after tar succeeded)
# ---------------------------------------------------------------------------
if [[ ! -f $OUT/.unpacked ]]; then
    log "stage: unpack $(basename "$SRC_TARBALL")"
    rm -rf "$BUILD"
    mkdir -p "$BUILD"
    tar -xf "$SRC_TARBALL" -C "$BUILD" --strip-components=1
    touch "$OUT/.unpacked"
fi

# ---------------------------------------------------------------------------
# 5. configure + verify
# ---------------------------------------------------------------------------
cat "$COMMON_FRAGMENT" "$GEN_FRAGMENT" >"$FRAGMENT"
log "stage: configure (allnoconfig + kernel.config + kernel-$GEN.config, olddefconfig)"
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
    printf 'build-kernel %s: ERROR: %d option(s) from the fragments did not survive olddefconfig:\n' \
        "$GEN" "${#dropped[@]}" >&2
    printf '  %s\n' "${dropped[@]}" >&2
    printf 'Fix their dependencies in %s or %s.\n' "$COMMON_FRAGMENT" "$GEN_FRAGMENT" >&2
    exit 1
fi
log "config ok: all $(grep -cE '^CONFIG_' "$FRAGMENT") fragment options set; $(grep -cE '=y$' "$BUILD/.config") options =y in total"

# ---------------------------------------------------------------------------
# 6. build (make output goes to build.log; a heartbeat goes to stderr)
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
        printf 'build-kernel %s: ERROR: %s failed (exit %d); last lines of %s:\n' "$GEN" "$stage" "$rc" "$LOGF" >&2
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
echo "$GEN" >"$OUT/generation"
echo "$SRC_PKG $SRC_VERSION" >"$OUT/source-version"
cp "$BUILD/.config" "$OUT/config"
cp "$BUILD/arch/x86/boot/bzImage" "$IMAGE.tmp"
mv "$IMAGE.tmp" "$IMAGE"
log "done: $RELEASE, bzImage $(stat -c %s "$IMAGE") bytes, $(( $(date +%s) - START ))s total ($(ccache -s 2>/dev/null | grep -iE '^ *hits' | head -1 | xargs))"
echo "$IMAGE"

#!/usr/bin/env bash
# Build (or reuse) ksdisk.ko for a keyslot-trace test kernel.
#
#   KO=$(tests/ksdisk/build.sh [GEN])   # GEN: 5.10, 6.1 (default) or 6.12
#                                       # progress on stderr; last stdout line = .ko path
#
# Finds the kernel via tests/vm/build-kernel.sh GEN (instant when cached; builds it
# otherwise), builds in a scratch copy of the sources (nothing is written into the
# repository) with W=1 and fails on any compiler warning in ksdisk.c, and caches the
# result next to that kernel (so per generation):
#   <kernel cache dir>/ksdisk-<sha256(ksdisk.c, Kbuild, kernelrelease)[:16]>/ksdisk.ko
# Env: KSDISK_KERNEL_BZIMAGE=<path> skips build-kernel.sh (its parent dir must have build/;
#      GEN is then ignored), JOBS (make -j), KSDISK_REBUILD=1 ignores the cache.
set -euo pipefail
SCRIPT_DIR=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
REPO=$(dirname "$(dirname "$SCRIPT_DIR")")
log() { printf '[ksdisk-build] %s\n' "$*" >&2; }
die() { printf 'ksdisk-build: ERROR: %s\n' "$*" >&2; exit 1; }

(($# <= 1)) || die "usage: $0 [GEN]   (GEN: 5.10, 6.1 or 6.12; default 6.1)"
GEN=${1:-6.1}
if [[ -n ${KSDISK_KERNEL_BZIMAGE:-} ]]; then
    BZ=$KSDISK_KERNEL_BZIMAGE
else
    BZ=$("$REPO/tests/vm/build-kernel.sh" "$GEN" | tail -n1)
fi
[[ -f $BZ ]] || die "no bzImage at '$BZ'"
KCACHE=$(dirname "$BZ")
KDIR=$KCACHE/build
[[ -f $KDIR/Module.symvers ]] || die "$KDIR is not a built kernel tree (no Module.symvers)"
REL=$(cat "$KDIR/include/config/kernel.release")
HASH=$( { cat "$SCRIPT_DIR/ksdisk.c" "$SCRIPT_DIR/Kbuild"; echo "$REL"; } | sha256sum | cut -c1-16)
OUT=$KCACHE/ksdisk-$HASH
KO=$OUT/ksdisk.ko
if [[ -f $KO && ${KSDISK_REBUILD:-0} != 1 ]]; then
    log "cached: $KO"
    echo "$KO"; exit 0
fi
mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/src.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cp "$SCRIPT_DIR/ksdisk.c" "$SCRIPT_DIR/Kbuild" "$WORK/"
log "building against $KDIR ($REL)"
if ! make -C "$KDIR" M="$WORK" -j"${JOBS:-$(nproc)}" W=1 modules >"$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log" >&2
    die "module build failed (full log: $OUT/build.log)"
fi
# W=1 warnings in ksdisk.c fail the build (the .ko is not cached). Warnings that
# kbuild prints about other files (modpost, BTF of the module) are only shown.
if grep -E '(^|/)ksdisk\.c:[0-9]+(:[0-9]+)?: (warning|error):' "$OUT/build.log" >&2; then
    die "compiler warnings in ksdisk.c (above; full log: $OUT/build.log)"
fi
if grep -E 'warning:' "$OUT/build.log" >&2; then log "(warnings above, not from ksdisk.c)"; fi
cp "$WORK/ksdisk.ko" "$KO.tmp" && mv "$KO.tmp" "$KO"
log "built: $KO"
echo "$KO"

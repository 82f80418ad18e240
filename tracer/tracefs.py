"""Record without bcc: a POSIX sh script that traces the keyslot manager through
tracefs kprobe events (`keyslot-trace tracefs-script`).

A phone has no bcc, no clang and no Python, but every kernel with
CONFIG_KPROBE_EVENTS can define kprobes from a shell. The generated script
defines kprobes and kretprobes in a group of its own, records them into a
trace instance of its own (the main ring buffer is left alone), and on exit
removes everything it made. It fetches pointers, the slot argument, num_slots
and return values only: never a key byte. `keyslot-trace import`
(tracer/capture.py) turns its capture into trace format v1; the capture is the
only place a raw kernel pointer is ever written.

The fetch-args dereference structs at fixed offsets. They come from the
kernel's BTF when given (``--btf``; a phone's /sys/kernel/btf/vmlinux can be
pulled with adb), else from LAYOUTS below. The script must run under
busybox sh, toybox/mksh (Android) and dash: no bashisms.
"""

from __future__ import annotations

from dataclasses import dataclass

from tracer import __version__
from tracer.btf import BTF, BTFError
from tracer.probes import EVICT_CALLBACKS, GENERATIONS, PROGRAM_CALLBACKS

CAPTURE_MAGIC = "# keyslot-trace tracefs capture 1"


@dataclass(frozen=True)
class Layout:
    """Offsets (bytes) the fetch-args use, for one API generation."""

    profile_struct: str
    keyslot_struct: str
    num_slots: int  # profile->num_slots
    slots: int  # profile->slots: the keyslot array
    evict_op: int  # profile->ll_ops.keyslot_evict: whose driver evicts
    keyslot_size: int  # sizeof(struct keyslot): slot index = (slot - slots) / size
    keyslot_profile: int  # slot->profile: a put knows its profile only through its slot
    source: str = "table"


# Mainline layouts on 64-bit kernels without lock debugging (rw_semaphore of 40
# bytes, no lockdep map). tests/tracer/test_tracefs.py and the VM tests check
# them against each test kernel's own BTF. Android GKI adds fields (wrapped-key
# ops, ABI padding): use --btf there.
LAYOUTS = {
    "blk_crypto": Layout("blk_crypto_profile", "blk_crypto_keyslot", 48, 160, 8, 56, 48),
    "blk_ksm": Layout("blk_keyslot_manager", "blk_ksm_keyslot", 48, 160, 8, 56, 48),
}
_MEMBER_NAMES = {  # generation -> (ll_ops member, keyslot->profile member)
    "blk_crypto": ("ll_ops", "profile"),
    "blk_ksm": ("ksm_ll_ops", "ksm"),
}


def layout_from_btf(btf: BTF, generation: str) -> Layout:
    table = LAYOUTS[generation]
    ops, owner = _MEMBER_NAMES[generation]
    p, k = table.profile_struct, table.keyslot_struct
    return Layout(p, k, btf.offset(p, "num_slots"), btf.offset(p, "slots"), btf.offset(p, f"{ops}.keyslot_evict"),
                  btf.struct_size(k), btf.offset(k, owner),
                  source=f"BTF ({btf.source})")


def layouts(btf: BTF | None) -> dict[str, Layout]:
    """Each generation's layout: from BTF for the generation it describes, the table otherwise."""
    out = dict(LAYOUTS)
    if btf is not None:
        found = [g for g, lay in LAYOUTS.items() if btf.has_struct(lay.profile_struct)]
        if not found:
            raise BTFError(f"{btf.source}: no keyslot manager struct (kernel without CONFIG_BLK_INLINE_ENCRYPTION?)")
        for g in found:
            out[g] = layout_from_btf(btf, g)
    return out


# The slot-grabbing helper of get: static, so only an .isra clone may exist
# (reference section 9). What it returns is what a hit gets; on a miss the driver's
# program callback names the slot instead. It returns the slot index on blk_ksm
# kernels and a slot pointer since 5.16, and on the 5.10.y/5.15.y that took the
# May-2023 backports (seen in 5.10.262's code): fetched whole, read by the import.
GRAB = {"blk_crypto": "blk_crypto_find_and_grab_keyslot", "blk_ksm": "blk_ksm_find_and_grab_keyslot"}


def _symbol(generation: str, probe: str) -> str:
    spec = next(s for s in GENERATIONS[generation] if s.name == probe)
    return spec.candidates[0] if spec.candidates else ""


def _define_function(generation: str, lay: Layout) -> str:
    """sh function defining this generation's manager probes (callbacks are separate)."""
    # the manager's own functions, never a clone: a clone's arguments may differ
    sym = lambda probe: f"$(exact_symbol {_symbol(generation, probe)})"  # noqa: E731
    n, s = lay.num_slots, lay.slots
    lines = [
        f"define_{generation}() {{",
        f'\tprobe get p "{sym("get")}" "profile=\\$arg1:x64 key=\\$arg2:x64 nslots=+{n}(\\$arg1):u32'
        f' slots=+{s}(\\$arg1):x64 comm=\\$comm $FALLBACK_ARG" || return 1',
        f'\tprobe get_r r512 "{sym("get")}" "status=\\$retval:u8" || return 1',
        f'\tprobe grab_r r512 "$(find_symbol {GRAB[generation]})" '
        '"ret=\\$retval:x64"',
        # put(NULL) returns at once; its fetches fault and are ignored by import
        f'\tprobe put p "{sym("put")}" "slot=\\$arg1:x64 profile=+{lay.keyslot_profile}(\\$arg1):x64'
        f' slots=+{s}(+{lay.keyslot_profile}(\\$arg1)):x64 nslots=+{n}(+{lay.keyslot_profile}(\\$arg1)):u32'
        f' $FALLBACK_ARG" || return 1',
        f'\tprobe put_r r64 "{sym("put")}" "" || return 1',
        f'\tprobe evict p "{sym("evict")}" "profile=\\$arg1:x64 key=\\$arg2:x64 nslots=+{n}(\\$arg1):u32'
        f' drv=+{lay.evict_op}(\\$arg1):symbol $FALLBACK_ARG" || return 1',
        f'\tprobe evict_r r64 "{sym("evict")}" "ret=\\$retval:s32" || return 1',
        f'\tprobe reprogram p "{sym("reprogram_all")}" "profile=\\$arg1:x64 nslots=+{n}(\\$arg1):u32 $FALLBACK_ARG"',
        f'\tprobe reprogram_r r16 "{sym("reprogram_all")}" ""',
        f'\tprobe init p "{sym("profile_init")}" "profile=\\$arg1:x64 nslots=\\$arg2:u32 $FALLBACK_ARG"',
        f'\tprobe init_r r16 "{sym("profile_init")}" "ret=\\$retval:s32"',
    ]
    if _symbol(generation, "profile_init_passthrough"):
        lines += [f'\tprobe initpt p "{sym("profile_init_passthrough")}" "profile=\\$arg1:x64"',
                  f'\tprobe initpt_r r16 "{sym("profile_init_passthrough")}" ""']
    lines += [f'\tprobe destroy p "{sym("profile_destroy")}" "profile=\\$arg1:x64"',
              f'\techo "# layout {lay.source}: num_slots={n} slots={s} keyslot_size={lay.keyslot_size}'
              f' keyslot_profile={lay.keyslot_profile} evict_op={lay.evict_op}" >> "$OUT"',
              "}"]
    return "\n".join(lines)


def script(btf: BTF | None = None, callbacks: tuple[str, ...] = ()) -> str:
    """The capture script. ``callbacks``: extra driver callbacks as SYMBOL or
    MODULE:SYMBOL (a module not loaded yet is probed when it loads)."""
    lays = layouts(btf)
    known = " ".join(PROGRAM_CALLBACKS + EVICT_CALLBACKS)
    extra = " ".join(callbacks)
    defines = "\n\n".join(_define_function(g, lays[g]) for g in ("blk_crypto", "blk_ksm"))
    return (_TEMPLATE.replace("@VERSION@", __version__).replace("@MAGIC@", CAPTURE_MAGIC)
            .replace("@DEFINES@", defines).replace("@KNOWN_CALLBACKS@", known).replace("@EXTRA_CALLBACKS@", extra)
            .replace("@GET_CRYPTO@", _symbol("blk_crypto", "get")).replace("@GET_KSM@", _symbol("blk_ksm", "get")))


_TEMPLATE = r'''#!/bin/sh
# keyslot-trace @VERSION@ tracefs capture script (generated by `keyslot-trace tracefs-script`).
#
# Traces the Linux inline-encryption keyslot manager (blk-crypto) through tracefs kprobe
# events, for a machine without bcc: an Android phone (adb shell, as root), a minimal host.
# Runs under busybox sh, toybox/mksh and dash. Needs root and CONFIG_KPROBE_EVENTS.
#
#   sh keyslot-capture.sh [-o FILE] [-d SECONDS] [-b BUFFER_KB]
#
# Then, on a machine with keyslot-trace:  keyslot-trace import FILE -o trace.ndjson
#
# THE CAPTURE FILE HOLDS RAW KERNEL POINTERS (profile, key and slot addresses: KASLR).
# Keep it private and delete it after `keyslot-trace import`, which replaces every pointer
# with a salted fingerprint. No key byte is ever read.
#
# Everything this script creates (its kprobe group, its trace instance) is removed on exit,
# including on Ctrl-C and SIGTERM.
set -u
OUT=keyslot-capture.txt
DURATION=0
BUFFER_KB=4096
usage() { sed -n '2,17s/^# \{0,1\}//p' "$0" >&2; }
while [ $# -gt 0 ]; do
	case "$1" in
	-o) OUT=${2:?-o needs a file}; shift 2 ;;
	-d) DURATION=${2:?-d needs seconds}; shift 2 ;;
	-b) BUFFER_KB=${2:?-b needs a size in KiB}; shift 2 ;;
	-h|--help) usage; exit 0 ;;
	*) echo "keyslot-capture: unknown option $1 (-o FILE, -d SECONDS, -b BUFFER_KB)" >&2; exit 2 ;;
	esac
done
case "$DURATION$BUFFER_KB" in *[!0-9]*) echo "keyslot-capture: -d and -b take whole numbers" >&2; exit 2 ;; esac
die() { echo "keyslot-capture: $*" >&2; exit 1; }

T=""
for d in /sys/kernel/tracing /sys/kernel/debug/tracing; do
	[ -w "$d/kprobe_events" ] && { T=$d; break; }
done
[ -n "$T" ] || die "no writable tracefs kprobe_events (not root? mount -t tracefs nodev /sys/kernel/tracing; needs CONFIG_KPROBE_EVENTS)"
[ -r /proc/kallsyms ] || die "cannot read /proc/kallsyms"

G=kst_$$            # our kprobe group: nobody else's probes are touched
I=$T/instances/$G   # our ring buffer: the main one is left alone
SYMS=$OUT.syms
# The polls go to a file of their own, appended to the capture at the end: written into
# the capture beside the reader, one landed inside an event line that cat wrote in two parts.
POLLS=$OUT.polls
DEFINED=""
READER=""
SLEEPER=""
: > "$OUT" || die "cannot write $OUT"

cpu_stats() {  # the instance's per-CPU ring-buffer counters (overrun, dropped events), one line per CPU
	for f in "$I"/per_cpu/cpu*/stats; do
		c=${f%/stats}; c=${c##*/cpu}
		echo "# $1 cpu$c $(tr '\n' ' ' < "$f")"
	done
}

read_now() {  # NOW: the instance's trace clock, read with builtins (a fork can take most of a second under emulation)
	NOW=
	while read -r word _ value _; do
		[ "$word" = now ] && NOW=$value
	done < "$I/per_cpu/cpu0/stats"
}

poll_misses() {  # the kernel's counts of probe hits it skipped, between two stamps of the trace clock
	# A hit counted here was skipped before the second stamp, and after the first
	# stamp of the previous poll: import makes that the loss's window.
	read_now; before=$NOW
	missed=
	# kprobe_profile names events without their group: keep ours
	while read -r name _ count _; do
		case " $DEFINED " in *" $name "*) [ "$count" -gt 0 ] && missed="$missed $name $count" ;; esac
	done 2>/dev/null < "$T/kprobe_profile"
	read_now
	echo "# poll $before $NOW"
	# shellcheck disable=SC2086 # split into name/count pairs
	set -- $missed
	while [ $# -ge 2 ]; do
		echo "# missed $NOW $1 $2"
		shift 2
	done
}

cleanup() {
	trap - EXIT
	trap '' INT TERM HUP   # a second Ctrl-C must not cut the cleanup short
	[ -n "$SLEEPER" ] && kill "$SLEEPER" 2>/dev/null
	if [ -d "$I" ]; then
		echo 0 > "$I/tracing_on" 2>/dev/null
		if [ -n "$READER" ]; then
			# let the reader drain what the buffer still holds, then stop it
			n=0
			while [ $n -lt 50 ] && kill -0 "$READER" 2>/dev/null && grep -q '^entries: [1-9]' "$I"/per_cpu/cpu*/stats 2>/dev/null; do
				sleep 0.1; n=$((n + 1))
			done
			sleep 0.2
			kill "$READER" 2>/dev/null
			wait "$READER" 2>/dev/null
		fi
		{
			cat "$POLLS" 2>/dev/null
			echo "# end $(cat /proc/uptime)"
			cpu_stats stats
			poll_misses
		} >> "$OUT"
		echo 0 > "$I/events/$G/enable" 2>/dev/null
		rmdir "$I" 2>/dev/null || echo "keyslot-capture: could not remove $I" >&2
	fi
	for e in $DEFINED; do
		echo "-:$G/$e" >> "$T/kprobe_events" 2>/dev/null || echo "keyslot-capture: could not remove probe $G/$e" >&2
	done
	rm -f "$SYMS" "$POLLS"
	echo "keyslot-capture: removed its probes; capture in $OUT (raw kernel pointers: keep it private)" >&2
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# Every symbol this script may probe, with its address, in one pass over kallsyms.
# (bcc's fentry programs are symbols too, in module [bpf], named after what they trace)
awk '($2 ~ /^[tTwW]$/ && $4 != "[bpf]" && ($3 ~ /^(__)?blk_(crypto|ksm)_/ || $3 ~ /keyslot_(program|evict)$/)) ||
     $3 == "blk_crypto_fallback_profile" || $3 == "blk_crypto_ksm" { print $3, $1, $4 }' /proc/kallsyms > "$SYMS" ||
	die "cannot write $SYMS"
find_symbol() {  # the symbol itself, else its .isra/.constprop clone
	awk -v n="$1" '$1 == n { print $1; found = 1; exit }
		$1 ~ ("^" n "[.](isra|constprop)[.][0-9]+$") && !clone { clone = $1 }
		END { if (!found && clone) print clone }' "$SYMS"
}
exact_symbol() { awk -v n="$1" '$1 == n { print $1; exit }' "$SYMS"; }
address_of() { awk -v n="$1" '$1 == n { print $2; exit }' "$SYMS"; }

probe() {  # probe EVENT p|rN SYMBOL FETCHARGS: define one kprobe in our group
	[ -n "$3" ] || { echo "# probe $1 - missing" >> "$OUT"; return 1; }
	# Named for removal before it is made: a signal between the two would leave it behind.
	DEFINED="$1 $DEFINED"   # removed in reverse order
	if echo "${2}:$G/$1 $3 $4" >> "$T/kprobe_events" 2>/dev/null; then
		echo "# probe $1 $3 ok" >> "$OUT"
	else
		DEFINED=${DEFINED#"$1 "}
		echo "# probe $1 $3 failed" >> "$OUT"
		return 1
	fi
}

@DEFINES@

# Driver callbacks: the known ones and any *keyslot_program / *keyslot_evict present,
# plus those named when the script was generated (MODULE:SYMBOL waits for its module).
CALLBACKS=""
case $(uname -m) in
x86_64) ARG_REGISTERS="%di %si %dx" ;;
aarch64|arm64) ARG_REGISTERS="%x0 %x1 %x2" ;;
*) ARG_REGISTERS="" ;;
esac
define_callbacks() {
	i=0
	for cb in $(awk '$1 ~ /keyslot_(program|evict)$/ { print $1 }' "$SYMS") @KNOWN_CALLBACKS@ @EXTRA_CALLBACKS@; do
		s=${cb#*:}
		case " $CALLBACKS " in *" $cb "*|*":$s "*|*" $s "*) continue ;; esac
		case "$cb" in
		*:*) ;;
		*) grep -q "^$s " "$SYMS" || continue   # a known driver that is not here
		   m=$(awk -v n="$s" '$1 == n { print $3; exit }' "$SYMS" | tr -d '[]')
		   [ -n "$m" ] && cb="$m:$s" ;;        # a module's: probe it again when it reloads
		esac
		case "$s" in
		*program) kind=prog ;;
		*) kind=devict ;;
		esac
		args='$arg1 $arg2 $arg3'
		# A module not loaded yet: the kernel cannot tell that MODULE:SYMBOL is a function
		# entry, so it refuses $argN there; name the argument registers instead.
		grep -q "^$s " "$SYMS" || args=$ARG_REGISTERS
		[ -n "$args" ] || { echo "# probe $kind$i $cb unsupported-arch" >> "$OUT"; continue; }
		set -- $args
		probe "$kind$i" p "$cb" "profile=$1:x64 key=$2:x64 slot=$3:u32" &&
			probe "${kind}${i}_r" r64 "$cb" "ret=\$retval:s32" && CALLBACKS="$CALLBACKS $cb"
		i=$((i + 1))
	done
}

{
	echo "@MAGIC@"
	echo "# tool keyslot-trace @VERSION@"
	echo "# kernel $(uname -r)"
	echo "# host $(uname -n)"
	echo "# start $(date -u +%Y-%m-%dT%H:%M:%SZ) $(cat /proc/uptime)"
} >> "$OUT"

FALLBACK_ARG=""
FB=$(address_of blk_crypto_fallback_profile)
[ -n "$FB" ] || FB=$(address_of blk_crypto_ksm)
if [ -n "$FB" ]; then
	# 5.8-6.4 a static struct, 6.5+ and 6.1.y a pointer to one: import matches either
	echo "# fallback 0x$FB" >> "$OUT"
	FALLBACK_ARG="fb=@0x$FB:x64"
fi
# The May-2023 fix (evict unlinks on error) renamed the request-path helpers (tracer/probes.py)
grep -q "^__blk_crypto_rq_put_keyslot " "$SYMS" && echo "# has __blk_crypto_rq_put_keyslot" >> "$OUT"
if grep -q "^@GET_CRYPTO@ " "$SYMS"; then
	echo "# generation blk_crypto" >> "$OUT"
	define_blk_crypto || die "could not define the keyslot manager's probes (see $OUT)"
elif grep -q "^@GET_KSM@ " "$SYMS"; then
	echo "# generation blk_ksm" >> "$OUT"
	define_blk_ksm || die "could not define the keyslot manager's probes (see $OUT)"
else
	die "no keyslot manager in this kernel (CONFIG_BLK_INLINE_ENCRYPTION is off?)"
fi
define_callbacks

mkdir "$I" || die "cannot make trace instance $I"
echo "$BUFFER_KB" > "$I/buffer_size_kb" || echo "keyslot-capture: could not set the buffer size" >&2
if grep -q mono "$I/trace_clock"; then
	echo mono > "$I/trace_clock"; echo "# clock mono" >> "$OUT"
else
	echo "# clock $(sed 's/.*\[\(.*\)\].*/\1/' "$I/trace_clock")" >> "$OUT"
fi
cpu_stats start-stats >> "$OUT"
echo 1 > "$I/events/$G/enable" || die "cannot enable $G in $I"
echo "# begin" >> "$OUT"
# An asynchronous command in a non-interactive sh ignores SIGINT: Ctrl-C reaches
# the script, whose cleanup lets the reader drain the buffer first.
cat "$I/trace_pipe" >> "$OUT" &
READER=$!
echo "keyslot-capture: tracing into $OUT ($(echo $DEFINED | wc -w) probes; Ctrl-C stops)" >&2
# Once a second: the kernel's miss counters, so that import can say when a miss happened
# (a window of a second) rather than "somewhere in the capture".
elapsed=0
while kill -0 "$READER" 2>/dev/null && { [ "$DURATION" -eq 0 ] || [ "$elapsed" -lt "$DURATION" ]; }; do
	sleep 1 &
	SLEEPER=$!
	wait $SLEEPER   # a trapped signal interrupts wait, not a foreground sleep
	elapsed=$((elapsed + 1))
	poll_misses >> "$POLLS"
done
exit 0
'''

"""Reading real traces in the VM tests: scenario windows, and whether two traces of the
same run (two recorders, two attach mechanisms) saw the same history."""

from __future__ import annotations

from collections import defaultdict
from difflib import SequenceMatcher

from replay.checker import Verdict
from replay.mutate import dump_records, load_records
from replay.trace import Event, Trace

# What the kernel did, as opposed to what the recorder says about itself (lost markers,
# profile_attach) or about names (profile_register).
OPERATION_KINDS = {"get_call", "get_return", "put_call", "put_return", "evict_call", "evict_return",
                   "program_call", "program_return", "drv_evict_call", "drv_evict_return", "reprogram_call",
                   "reprogram_return", "profile_init", "profile_destroy"}
# how far apart two recorders of one run may stamp the same event (history_differences;
# seen: 6.8 ms for an idle-task put_return under QEMU TCG on 6.12)
RECORDER_SKEW_NS = 50_000_000


def in_window(trace: Trace, start: int, end: int, kind: str | None = None, profiles=None) -> list[Event]:
    return [e for e in trace.events if start <= e.t <= end and (kind is None or e.kind.name == kind)
            and (profiles is None or e.profile in profiles)]


def window_bytes(data: bytes, start: int, end: int) -> bytes:
    """The header and the events of [start, end] of a trace file, as a trace that starts
    as if the recorder had attached at ``start``: a profile created earlier (the
    fallback, shared by every scenario) gets the profile_attach record would write, so
    it starts in an unknown state instead of an unknown size."""
    header, records = load_records(data)
    live: dict[str, dict] = {}
    for r in records:
        if r["t"] >= start:
            break
        if r["ev"] in ("profile_init", "profile_attach"):
            live[r["p"]] = {"num_slots": r["num_slots"], **({"device": r["device"]} if r.get("device") else {})}
        elif r["ev"] == "profile_register" and r["p"] in live:
            live[r["p"]]["device"] = r["device"]
        elif r["ev"] == "profile_destroy":
            live.pop(r["p"], None)
    attach = [{"t": start, "cpu": 0, "tid": 0, "ev": "profile_attach", "p": p, **info} for p, info in live.items()]
    return dump_records(header, attach + [r for r in records if start <= r["t"] <= end])


def kernel_misses(trace: Trace, start: int, end: int) -> int:
    """Probe hits the kernel skipped in [start, end] and the recorder reported (lost
    markers with a window: kprobe re-entry, BPF recursion; tracer/record.py MissCounters)."""
    return sum(e.count or 0 for e in trace.events if e.kind.name == "lost" and e.since is not None
               and e.since <= end and e.t >= start)


def verdict_is_sound(verdict: Verdict, missed: int) -> bool:
    """AGREE, or UNKNOWN because the recorder reported probe hits the kernel skipped:
    never DIVERGED, and never UNKNOWN for another reason."""
    return verdict is Verdict.AGREE or (verdict is Verdict.UNKNOWN and missed > 0)


def _unmatched(xs: list[Event], ys: list[Event]) -> list[Event]:
    """Events of either list with no event of the same outcome in the other within
    RECORDER_SKEW_NS (matched in time order, each at most once)."""
    left = []
    by_outcome: dict = defaultdict(lambda: ([], []))
    for side, events in ((0, xs), (1, ys)):
        for e in events:
            by_outcome[_outcome(e)][side].append(e)
    for us, them in by_outcome.values():
        i = j = 0
        while i < len(us) and j < len(them):
            if abs(us[i].t - them[j].t) <= RECORDER_SKEW_NS:
                i, j = i + 1, j + 1
            elif us[i].t < them[j].t:
                left.append(us[i])
                i += 1
            else:
                left.append(them[j])
                j += 1
        left += us[i:] + them[j:]
    return sorted(left, key=lambda e: e.t)


def _outcome(e: Event) -> tuple:
    return (e.kind.name, e.slot, e.result, e.num_slots)


def history_differences(a: Trace, b: Trace, start: int, end: int) -> list[str]:
    """How two traces of the same kernel activity in [start, end] differ, as sentences
    (empty: they agree). The traces' fingerprints are salted per recording, so keys and
    profiles are matched by position: the mapping must be one-to-one.

    Gets, evicts, reprograms, the driver callbacks inside them and profile life cycle
    run in task context: compared per thread, in order (a thread's operations are
    sequential; dm's nested evicts too). Puts also run from interrupts (request
    completion), and an interrupt lands on whichever task it interrupts (its tid, or 0
    in every CPU's idle task) and may fall between the two recorders' probes on one
    function; a recorder that knows interrupts (bcc on x86-64: header irq_context) writes
    tid 0 for it, one that does not (tracefs) the interrupted task's: puts are compared
    as one multiset, by outcome and time."""
    problems = []
    mapping: dict[str, dict[str, str]] = {"key": {}, "profile": {}}

    def same(kind: str, x: str | None, y: str | None, where: str) -> None:
        if (x is None) != (y is None):
            problems.append(f"{where}: {kind} {x} vs {y}")
            return
        if x is None:
            return
        fwd, back = mapping[kind], mapping.setdefault(kind + "-back", {})
        if fwd.setdefault(x, y) != y or back.setdefault(y, x) != x:
            problems.append(f"{where}: {kind} {x} is {fwd[x]} elsewhere, here {y}")

    # What a recorder reported missing is no difference: leave its loss windows out. The
    # two recorders stamp one event apart (seen: up to 6.8 ms under QEMU TCG),
    # so an event near a window's edge may fall inside it in one trace only: a difference
    # made only of events within RECORDER_SKEW_NS of a window is excused.
    gaps = [(e.since, e.t) if e.since is not None else (e.t, float("inf")) for tr in (a, b) for e in tr.events
            if e.kind.name == "lost"]

    def near_gap(e: Event) -> bool:
        return any(lo - RECORDER_SKEW_NS <= e.t <= hi + RECORDER_SKEW_NS for lo, hi in gaps)

    def threads(trace: Trace):
        seqs, puts = defaultdict(list), defaultdict(list)
        for e in trace.events:
            if any(lo <= e.t <= hi for lo, hi in gaps):
                continue
            if start <= e.t <= end and e.kind.name in OPERATION_KINDS:
                if e.kind.name in ("put_call", "put_return"):
                    puts["any"].append(e)
                else:
                    seqs[e.tid].append(e)
        return seqs, puts

    (sa, ia), (sb, ib) = threads(a), threads(b)
    only = [t for t in set(sa) ^ set(sb) if not all(near_gap(e) for e in sa.get(t, []) + sb.get(t, []))]
    if only:
        problems.append(f"threads only in one trace: {sorted(only)[:10]}")
    for tid in sorted(set(sa) & set(sb)):
        xs, ys = sa[tid], sb[tid]
        blocks = SequenceMatcher(None, [_outcome(e) for e in xs], [_outcome(e) for e in ys], autojunk=False)
        for op, i1, i2, j1, j2 in blocks.get_opcodes():
            if op == "equal":
                for x, y in zip(xs[i1:i2], ys[j1:j2]):
                    where = f"tid {tid} {x.kind.name} at {x.t}"
                    same("key", x.key, y.key, where)
                    same("profile", x.profile, y.profile, where)
                    # get_call: the same task, so the same process (tracefs cannot fetch the pid)
                    if x.comm != y.comm or None not in (x.pid, y.pid) and x.pid != y.pid:
                        problems.append(f"{where}: process {x.comm}:{x.pid} vs {y.comm}:{y.pid}")
            elif not all(near_gap(e) for e in xs[i1:i2] + ys[j1:j2]):
                problems.append(f"tid {tid}: {len(xs)} vs {len(ys)} events, differing at #{i1}: "
                                f"{[_outcome(e) for e in xs[i1:i2]][:3]} vs {[_outcome(e) for e in ys[j1:j2]][:3]}")
                break
    for tid in sorted(set(ia) | set(ib)):
        # the same put in both traces: same outcome, stamped within the recorders' skew
        unmatched = [e for e in _unmatched(ia.get(tid, []), ib.get(tid, [])) if not near_gap(e)]
        if unmatched:
            problems.append(f"{len(unmatched)} put event(s) in one trace only, first "
                            f"{_outcome(unmatched[0])} at {unmatched[0].t}")
    return problems
